"""What SDPO adds to a step, as ratios against a baseline measured in the same process.

    python benchmarks/bench_sdpo.py [--groups 32] [--group-size 8] [--response-chars 6000] [--rows 2048]
                                    [--vocab 16000] [--repeats 5]

1. Rollout side (no slime needed): the teacher views of one rollout built by SDPO's context (decode every response,
   pick the solutions, render and encode every reprompt) against the static context (render and encode a dataset
   teacher prompt holding a demonstration as long as a response), on the same samples and tokenizer (the small
   byte-level BPE of the tests: many tokens per word, so absolute times are pessimistic).
2. Trainer side (with slime importable): forward + backward of one micro-batch through slime's real ``loss_function``
   for the distillation loss alone (``none``), combined with slime's policy loss (``hybrid``), and slime's own
   ``policy_loss`` alone, on ``[rows, vocab]`` logits (full-vocabulary forward KL teacher inputs); times relative to
   slime's policy loss.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import median_seconds, packed_micro_batch, single_rank_slime  # noqa: E402
from slime_self_distill.config import SelfDistillConfig  # noqa: E402
from slime_self_distill.contexts.groups import sdpo_contexts  # noqa: E402
from slime_self_distill.custom_convert import (  # noqa: E402
    build_teacher_views,
    contextual_teacher_ids,
    teacher_views,
)
from slime_self_distill.data.templates import TEMPLATES, build_teacher_prompt, render_prompt  # noqa: E402
from slime_self_distill.data_source import (  # noqa: E402
    PLUGIN_METADATA_KEY,
    STUDENT_PROMPT_KEY,
    TEACHER_PROMPT_TEXT_KEY,
)
from tests.tokenizer_factory import make_tokenizer  # noqa: E402

WORDS = ("the answer is we add twelve and thirty so the sum is forty two because each step follows from the last "
         "let us check the units and the tens again before writing the final result").split()


def rollout(tokenizer, groups: int, group_size: int, response_chars: int, seed: int = 0) -> list:
    """Sample-like objects of one rollout: a system + user chat prompt per group, responses with a thinking block,
    rewards 0/1 (half the groups without a success), and a dataset teacher prompt for the static context."""
    rng = random.Random(seed)
    samples = []
    for g in range(groups):
        student = [{"role": "system", "content": "Answer the question."},
                   {"role": "user", "content": f"Question {g}: " + " ".join(rng.choices(WORDS, k=40))}]
        rendered = render_prompt(student, tokenizer, apply_chat_template=True)
        prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
        demonstration = " ".join(rng.choices(WORDS, k=response_chars // 6))
        teacher_text = render_prompt(build_teacher_prompt(student, demonstration, TEMPLATES["sdft"]), tokenizer,
                                     apply_chat_template=True)
        for i in range(group_size):
            text = "<think>" + " ".join(rng.choices(WORDS, k=60)) + "</think>\n" + " ".join(
                rng.choices(WORDS, k=response_chars // 6))
            response_ids = tokenizer.encode(text, add_special_tokens=False)
            samples.append(SimpleNamespace(
                index=len(samples), group_index=g, prompt=rendered, tokens=prompt_ids + response_ids,
                response_length=len(response_ids), remove_sample=False,
                reward=float(g % 2 == 0 and rng.random() < 0.5),
                metadata={PLUGIN_METADATA_KEY: {STUDENT_PROMPT_KEY: student, TEACHER_PROMPT_TEXT_KEY: teacher_text},
                          "teacher_prompt": None, "student": student, "demonstration": demonstration}))
    return samples


def rollout_side(args) -> None:
    tokenizer = make_tokenizer()
    samples = rollout(tokenizer, args.groups, args.group_size, args.response_chars)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def render(prompt, tools):
        return render_prompt(prompt, tokenizer, apply_chat_template=True, tools=tools)

    def static():  # the data source renders the row's teacher prompt, the converter encodes it
        for s in samples:
            render(build_teacher_prompt(s.metadata["student"], s.metadata["demonstration"], TEMPLATES["sdft"]), None)
        return build_teacher_views(samples, encode=encode, config=SelfDistillConfig())

    sdpo_config = SelfDistillConfig(teacher_context="sdpo", success_threshold=0.5)

    def sdpo():
        contexts = sdpo_contexts(Namespace(reward_key=None), samples, sdpo_config,
                                 lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        return teacher_views(samples, [contextual_teacher_ids(s, c, encode=encode, render=render, config=sdpo_config)
                                       for s, c in zip(samples, contexts.choices)])

    static_views, sdpo_views = static(), sdpo()
    static_seconds, sdpo_seconds = median_seconds(static, args.repeats), median_seconds(sdpo, args.repeats)
    with_teacher = [v for v in sdpo_views if v.has_teacher]
    print(f"rollout side: {len(samples)} samples, responses of {statistics.mean(s.response_length for s in samples):.0f} "
          f"tokens on average; SDPO gives {len(with_teacher)} a teacher, teacher prompts of "
          f"{statistics.mean([v.prompt_length for v in with_teacher] or [0]):.0f} tokens on average (static: "
          f"{statistics.mean(v.prompt_length for v in static_views):.0f})")
    print(f"  teacher views per rollout: static {static_seconds:.3f} s, sdpo {sdpo_seconds:.3f} s, "
          f"ratio {sdpo_seconds / static_seconds:.2f}")


def trainer_side(args) -> None:
    with single_rank_slime("trainer side") as slime:
        if slime is None:
            return
        g = torch.Generator().manual_seed(0)
        n = 4
        response = args.rows // n
        logits, batch = packed_micro_batch(n, 16, response, args.vocab, g)
        hidden_size = 64
        output_weight = torch.randn(args.vocab, hidden_size, generator=g) / hidden_size**0.5
        hidden = [torch.randn(response, hidden_size, generator=g) for _ in range(n)]
        batch.update({
            "advantages": [torch.full((response,), float(i % 2) - 0.5) for i in range(n)],
            "log_probs": [torch.full((response,), -3.0)] * n,
            "teacher_log_probs": [torch.full((response,), -2.0)] * n, "teacher_hidden_states": hidden,
            "self_distill_teacher_output_weight": output_weight,
            "self_distill_loss_weights": [1.0] * n,
        })
        common = dict(calculate_per_token_loss=False, recompute_loss_function=False, allgather_cp=False,
                      rollout_temperature=1.0, log_probs_chunk_size=-1, rollout_top_p=1.0, advantage_estimator="grpo",
                      use_rollout_logprobs=False, eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None, use_opsm=False,
                      get_mismatch_metrics=False, use_tis=False, custom_pg_loss_reducer_function_path=None,
                      entropy_coef=0.0, use_kl_loss=False, hidden_size=hidden_size)

        def step_of(loss_type, combination):
            config = SelfDistillConfig(kl_scope="full_vocab", teacher="live",
                                       rl_combination=combination, weight=0.5 if combination == "hybrid" else 1.0)
            step_args = Namespace(loss_type=loss_type,
                                  custom_loss_function_path="slime_self_distill.custom_loss.self_distill_loss",
                                  **common, **config.to_args_dict())

            def step():
                leaf = logits.clone().requires_grad_(True)
                loss, _, _ = slime.loss.loss_function(step_args, batch, 1, n, leaf)
                loss.backward()
            return step

        policy = median_seconds(step_of("policy_loss", "none"), args.repeats)
        none = median_seconds(step_of("custom_loss", "none"), args.repeats)
        hybrid = median_seconds(step_of("custom_loss", "hybrid"), args.repeats)
        print(f"trainer side: loss forward + backward on [{logits.shape[1]}, {args.vocab}] logits, relative to "
              f"slime's policy_loss ({policy:.3f} s): distillation alone {none / policy:.2f}, "
              f"hybrid (policy + distillation) {hybrid / policy:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--response-chars", type=int, default=6000)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rollout_side(args)
    trainer_side(args)


if __name__ == "__main__":
    main()
