"""Offline top-K distillation: extraction throughput and storage, and the SFT + KD loss against slime's sft_loss.

    python benchmarks/bench_offline_topk.py [--rows 64] [--response-words 120] [--vocab 32000] [--hidden 256]
                                            [--topk 64] [--loss-rows 2048] [--repeats 5]

1. Extraction (no slime needed): ``extract_teacher_topk`` end to end (tokenize, teacher forward, chunked top-K,
   parts, merge) on a tiny Qwen2 teacher built in-process, against the plain way in the same process: the model's
   full ``[T, V]`` logits, a float32 log-softmax and ``topk`` on the same batches. Tokens/s, the ratio, and the file's
   bytes per trained token against the bound 8 K + 8.
2. Loss (with slime importable): forward + backward through slime's real ``loss_function`` of the SFT + KD loss
   (``--self-distill-offline-topk-path``) and of slime's own ``sft_loss`` on the same ``[rows, vocab]`` logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import median_seconds, packed_micro_batch, single_rank_slime  # noqa: E402
from slime_self_distill.config import SelfDistillConfig  # noqa: E402
from slime_self_distill.data.sft_tokens import SftTokenizer  # noqa: E402
from slime_self_distill.extract_teacher_topk import main as extract  # noqa: E402
from slime_self_distill.offline.extraction import batches_of, ordered, plan_rows  # noqa: E402
from slime_self_distill.offline.topk_file import TopKFile  # noqa: E402

WORDS = ("the answer is we add twelve and thirty so the sum is forty two because each step follows from the last "
         "let us check the units and the tens again before writing the final result").split()


def chat_rows(rows: int, response_words: int) -> list:
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": f"Question {i}: " + " ".join(WORDS[i % 7:i % 7 + 12])},
                          {"role": "assistant", "content": " ".join(WORDS[(i + j) % len(WORDS)]
                                                                    for j in range(response_words))}]}
            for i in range(rows)]


def build_teacher(directory: Path, vocab: int, hidden: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.chat_tokenizers import chat_tokenizer

    tokenizer = chat_tokenizer("qwen25")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return tokenizer, model


def extraction(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer, model = build_teacher(tmp / "teacher", args.vocab, args.hidden)
        data = chat_rows(args.rows, args.response_words)
        with open(tmp / "chat.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in data)
        argv = ["--teacher", str(tmp / "teacher"), "--input", str(tmp / "chat.jsonl"), "--output-dir",
                str(tmp / "out"), "--top-k", str(args.topk), "--sort-by-length", "--quiet",
                "--max-tokens-per-batch", str(args.max_tokens_per_batch), "--overwrite"]
        ours = median_seconds(lambda: extract(argv), args.repeats)
        topk_file = TopKFile(str(tmp / "out" / "teacher_topk.parquet"))
        stored = (tmp / "out" / "teacher_topk.parquet").stat().st_size

        plan = plan_rows(((i + 1, row) for i, row in enumerate(data)), SftTokenizer(tokenizer, "qwen"),
                         Namespace(messages_key="messages", tool_key="tools", metadata_key="metadata",
                                   max_length=None))
        batches = batches_of(ordered(plan.rows, True), args.max_tokens_per_batch)

        @torch.no_grad()
        def full_logits():  # the plain way: [B, T, V] logits, a float32 log-softmax, then top-K
            for batch in batches:
                longest = max(len(row.tokens) for row in batch)
                ids = torch.zeros((len(batch), longest), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for b, row in enumerate(batch):
                    ids[b, :len(row.tokens)] = torch.from_numpy(row.tokens.astype("int64"))
                    mask[b, :len(row.tokens)] = 1
                log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                for b, row in enumerate(batch):
                    log_probs[b, torch.from_numpy(row.predicting)].topk(args.topk, -1)

        plain = median_seconds(full_logits, args.repeats)
        tokens = sum(len(row.tokens) for row in plan.rows)
        trained = topk_file.info.trained_tokens
        result = {"tokens": tokens, "trained": trained, "ours_s": ours, "plain_s": plain,
                  "bytes_per_trained_token": stored / trained, "bound": 8 * args.topk + 8}
        print(f"extraction: {args.rows} rows, {tokens} tokens ({trained} trained), V {args.vocab}, H {args.hidden}, "
              f"K {args.topk}: {tokens / ours:.0f} tokens/s ({trained / ours:.0f} trained tokens/s) end to end, "
              f"{ours / plain:.2f} x the plain full-logits forward + top-K ({plain:.2f} s); file "
              f"{stored / trained:.1f} bytes per trained token (bound 8 K + 8 = {8 * args.topk + 8})")
        return result


def loss_side(args) -> None:
    with single_rank_slime("loss") as slime:
        if slime is None:
            return
        g = torch.Generator().manual_seed(0)
        n = 4
        response = args.loss_rows // n
        logits, batch = packed_micro_batch(n, 16, response, args.vocab, g)
        teacher = torch.randn(response, args.vocab, generator=g).log_softmax(-1).topk(args.topk, -1)
        batch["teacher_topk_indices"] = [teacher.indices.to(torch.int32)] * n
        batch["teacher_topk_log_probs"] = [teacher.values] * n
        common = dict(calculate_per_token_loss=True, recompute_loss_function=False, allgather_cp=False,
                      rollout_temperature=1.0, log_probs_chunk_size=-1,
                      custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss")
        config = SelfDistillConfig(kl_scope="topk", topk=args.topk, offline_topk_path="unused.parquet")

        def step_of(loss_type):
            step_args = Namespace(loss_type=loss_type, **common, **config.to_args_dict())

            def step():
                leaf = logits.clone().requires_grad_(True)
                loss, _, _ = slime.loss.loss_function(step_args, batch, 1, n * response, leaf)
                loss.backward()
            return step

        sft = median_seconds(step_of("sft_loss"), args.repeats)
        kd = median_seconds(step_of("custom_loss"), args.repeats)
        print(f"loss: forward + backward on [{logits.shape[1]}, {args.vocab}] logits, K {args.topk}: SFT + KD "
              f"{kd / sft:.2f} x slime's sft_loss ({sft:.3f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--response-words", type=int, default=120)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--max-tokens-per-batch", type=int, default=8192)
    parser.add_argument("--loss-rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    extraction(args)
    loss_side(args)


if __name__ == "__main__":
    main()
