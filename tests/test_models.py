"""The standard models: each fxrec-sparse spelling computes what its plain-torch
spelling computes once they hold the same weights, and the bad configurations fail
with a message that names the problem."""
import pytest
import torch

from fxrec.models import (DLRM, DLRM_DCN, DLRM_DCNPlain, DLRMPlain, TwoTower, TwoTowerPlain,
                          dot_interaction, in_batch_softmax_loss)
from fxrec.modules import EmbeddingBagCollection, EmbeddingBagConfig
from fxrec.sparse import KeyedJaggedTensor

ROWS = [20, 7, 13]
DIM = 8
B = 5


def _ebc(pooling="sum"):
    return EmbeddingBagCollection([
        EmbeddingBagConfig(f"t{i}", n, DIM, [f"f{i}"], pooling=pooling) for i, n in enumerate(ROWS)])


def _batch(gen):
    lengths = torch.randint(0, 4, (len(ROWS), B), generator=gen)
    lengths[0, 0] = 0  # an empty bag
    ids = [torch.randint(0, n, (int(lengths[i].sum()),), generator=gen) for i, n in enumerate(ROWS)]
    kjt = KeyedJaggedTensor([f"f{i}" for i in range(len(ROWS))], torch.cat(ids), lengths=lengths.flatten())
    offsets = [torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)[:-1]]) for i in range(len(ROWS))]
    dense = torch.randn(B, 4, generator=gen)
    return dense, kjt, offsets, ids


def _copy_weights(src, dst):
    """Copy parameters in registration order; the two spellings register them alike."""
    ps, pd = list(src.parameters()), list(dst.parameters())
    assert [p.shape for p in ps] == [p.shape for p in pd]
    with torch.no_grad():
        for a, b in zip(ps, pd):
            b.copy_(a)


@pytest.mark.parametrize("fx_cls,plain_cls,extra", [
    (DLRM, DLRMPlain, {}),
    (DLRM_DCN, DLRM_DCNPlain, {"dcn_num_layers": 2, "dcn_low_rank_dim": 3}),
])
def test_sparse_and_plain_spellings_agree(fx_cls, plain_cls, extra):
    gen = torch.Generator().manual_seed(0)
    fx_model = fx_cls(_ebc(), 4, [16, DIM], [12, 1], **extra)
    plain = plain_cls(ROWS, DIM, 4, [16, DIM], [12, 1], **extra)
    # emb tables first in the plain model; move the fxrec model's to the same order
    plain_params = list(plain.named_parameters())
    fx_params = dict(fx_model.named_parameters())
    with torch.no_grad():
        for i in range(len(ROWS)):
            plain.emb_l[i].weight.copy_(fx_params[f"sparse_arch.embedding_bag_collection.embedding_bags.t{i}.weight"])
        dense_fx = [p for n, p in fx_model.named_parameters() if "embedding_bags" not in n]
        dense_plain = [p for n, p in plain_params if not n.startswith("emb_l")]
        for a, b in zip(dense_fx, dense_plain):
            b.copy_(a)
    dense, kjt, offsets, ids = _batch(gen)
    out = fx_model(dense, kjt)
    assert out.shape == (B, 1)
    torch.testing.assert_close(out, plain(dense, offsets, ids))


def test_dot_interaction_matches_pairwise_loop():
    gen = torch.Generator().manual_seed(1)
    dense, sparse = torch.randn(3, 4, generator=gen), torch.randn(3, 2, 4, generator=gen)
    vecs = [dense, sparse[:, 0], sparse[:, 1]]
    pairs = [(vecs[i] * vecs[j]).sum(1) for i in range(3) for j in range(i + 1, 3)]
    expected = torch.cat([dense, torch.stack(pairs, dim=1)], dim=1)
    torch.testing.assert_close(dot_interaction(dense, sparse), expected)


def test_two_tower_spellings_agree_with_shared_item_table():
    gen = torch.Generator().manual_seed(2)
    users, items, hist_len = 6, 11, 4
    ebc = EmbeddingBagCollection([
        EmbeddingBagConfig("user", users, DIM, ["user_id"]),
        EmbeddingBagConfig("item", items, DIM, ["user_history", "item_id"], pooling="mean")])
    fx_model = TwoTower(ebc, ["user_id", "user_history"], ["item_id"], [16, 8])
    plain = TwoTowerPlain(users, items, DIM, [16, 8])
    with torch.no_grad():
        plain.user.weight.copy_(ebc.embedding_bags["user"].weight)
        plain.item.weight.copy_(ebc.embedding_bags["item"].weight)
        for a, b in zip(list(fx_model.query_proj.parameters()) + list(fx_model.candidate_proj.parameters()),
                        list(plain.query_proj.parameters()) + list(plain.candidate_proj.parameters())):
            b.copy_(a)
    user_ids = torch.randint(0, users, (B,), generator=gen)
    item_ids = torch.randint(0, items, (B,), generator=gen)
    hist_lengths = torch.randint(0, hist_len + 1, (B,), generator=gen)
    history = torch.randint(0, items, (B, hist_len), generator=gen)
    hist_values = torch.cat([history[b, :hist_lengths[b]] for b in range(B)])
    kjt = KeyedJaggedTensor(["user_id", "user_history", "item_id"],
                            torch.cat([user_ids, hist_values, item_ids]),
                            lengths=torch.cat([torch.ones(B, dtype=torch.long), hist_lengths,
                                               torch.ones(B, dtype=torch.long)]))
    q, c = fx_model(kjt)
    q_ref, c_ref = plain(user_ids, history, hist_lengths, item_ids)
    assert q.shape == c.shape == (B, 8)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(c, c_ref)


def test_two_tower_reads_a_shared_feature_by_its_tables_keys():
    # the candidate's id feeds its id table and a coarser category-hash table, each keyed feature@table
    ebc = EmbeddingBagCollection([EmbeddingBagConfig("user", 6, DIM, ["user_id"]),
                                  EmbeddingBagConfig("item", 11, DIM, ["item_id"]),
                                  EmbeddingBagConfig("item_hash", 11, 4, ["item_id"])])
    model = TwoTower(ebc, ["user_id"], ["item_id@item", "item_id@item_hash"], [8])
    kjt = KeyedJaggedTensor(["user_id", "item_id"], torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4, dtype=torch.long))
    pooled = ebc(kjt).to_dict()
    _, c = model(kjt)
    torch.testing.assert_close(c, model.candidate_proj(torch.cat([pooled["item_id@item"],
                                                                  pooled["item_id@item_hash"]], dim=1)))
    with pytest.raises(ValueError, match=r"feature 'item_id' is no output.*'feature@table'"):
        TwoTower(ebc, ["user_id"], ["item_id"], [8])


def test_in_batch_softmax_loss_matches_definition_and_trains():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, generator=gen, requires_grad=True)
    c = torch.randn(4, 8, generator=gen)
    qn, cn = q / q.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    logits = qn @ cn.T / 0.1
    expected = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    loss = in_batch_softmax_loss(q, c, temperature=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    with torch.no_grad():
        q2 = q - 1.0 * q.grad
    assert in_batch_softmax_loss(q2, c, temperature=0.1) < loss


def test_dlrm_trains_on_a_fixed_batch():
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    model = DLRM(_ebc(), 4, [16, DIM], [12, 1])
    dense, kjt, _, _ = _batch(gen)
    labels = torch.randint(0, 2, (B, 1), generator=gen).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("build,match", [
    (lambda: DLRM(EmbeddingBagCollection([EmbeddingBagConfig("a", 5, 4, ["x"]), EmbeddingBagConfig("b", 5, 8, ["y"])]),
                  3, [4], [1]), r"same embedding_dim.*\[4, 8\]"),
    (lambda: DLRM(_ebc(), 4, [16, 6], [1]), r"end in the embedding dim 8"),
    (lambda: DLRMPlain(ROWS, DIM, 4, [16, 4], [1]), r"end in the embedding dim 8"),
    (lambda: TwoTower(_ebc(), ["f0"], ["nope"], [4]), r"feature 'nope' is no output of the collection"),
    (lambda: in_batch_softmax_loss(torch.zeros(2, 3), torch.zeros(3, 3)), r"differ in shape"),
])
def test_bad_configurations_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
