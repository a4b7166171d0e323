"""Peak memory of `fxrec.lower_for_inference`: how much the process's peak RSS grows while a
DLRM's tables are lowered, against the size of those tables.

    python bench/lowering_memory.py [--rows 100000] [--weight-dtype int8]

Each measurement runs in a fresh process, so ``ru_maxrss`` (the peak) sees only this model:
the peak after building the model and a batch, then after one lower_for_inference call.
The tables are 26 x rows x 64 fp32; the lowered module's own tables are part of the growth.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import warnings


def _measure(rows: int, weight_dtype: str, out) -> None:
    import fxrec
    from fxrec.datasets import SyntheticCriteo
    from fxrec.lowering import QuantizedEmbeddingBags
    from fxrec.models import DLRM

    T, D = 26, 64
    configs = [fxrec.EmbeddingBagConfig(name=f"t_{i}", num_embeddings=rows, embedding_dim=D,
                                        feature_names=[f"cat_{i}"]) for i in range(T)]
    model = DLRM(fxrec.EmbeddingBagCollection(configs), 13, [128, D], [256, 128, 1]).eval()
    batch = next(iter(SyntheticCriteo(num_embeddings=rows, num_tables=T, batch_size=256, num_batches=1)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = fxrec.lower_for_inference(model, (batch.dense_features, batch.sparse_features), weight_dtype)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quantized = sum(m.layout.numel for m in low.modules() if isinstance(m, QuantizedEmbeddingBags))
    out.put((T * rows * D * 4 / 2**20, quantized / 2**20, before, after))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--weight-dtype", default="int8")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(args.rows, args.weight_dtype, out))
    proc.start()
    tables, quantized, before, after = out.get()
    proc.join()
    print(f"tables {tables:.0f} MiB fp32 -> {quantized:.0f} MiB {args.weight_dtype}; peak RSS {before:.0f} MiB "
          f"before lowering, {after:.0f} MiB after: lowering grew the peak by {after - before:.0f} MiB")


if __name__ == "__main__":
    main()
