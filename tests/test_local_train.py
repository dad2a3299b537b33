"""The single-process trainer (``python -m slime_self_distill.local_train``) on a tiny Hugging Face model: resumes that
continue exactly, the teachers, the teacher contexts built after rewards, gradient accumulation, the command line,
the reports. Its parity with slime's training path is tests/test_local_parity.py; the demo (which learns) is
tests/test_local_demo.py."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from slime_self_distill import local_train, prepare_dataset  # noqa: E402
from slime_self_distill.config import SelfDistillConfig  # noqa: E402
from slime_self_distill.local import demo  # noqa: E402
from slime_self_distill.local.options import parse_run  # noqa: E402
from slime_self_distill.local.rollout import sample_rollout, score, train_data_of  # noqa: E402
from slime_self_distill.local.step import StepSettings, optimizer_step, teacher_output_spec, teacher_pass  # noqa: E402
from slime_self_distill.local.trainer import LocalTrainer, Teacher  # noqa: E402

RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "local_kv_demo.yaml")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A randomly initialised demo model and the demo task's rows, prepared (first 40 training rows, 16 held out)."""
    root = tmp_path_factory.mktemp("local_train")
    tokenizer = demo.demo_tokenizer()
    model = demo.demo_model(tokenizer, seed=3)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    raw = root / "raw"
    raw.mkdir()
    train, heldout = demo.write_demo_data(str(raw), train_keys=40, heldout_keys=16)
    for name, path in (("train", train), ("heldout", heldout)):
        assert prepare_dataset.main(["--input", path, "--output", str(root / f"{name}.jsonl"), "--quiet"]) == 0
    return root


def run_arguments(workspace, output_dir, *extra) -> list:
    return ["--custom-config-path", RECIPE, "--hf-checkpoint", str(workspace / "model"), "--prompt-data",
            str(workspace / "train.jsonl"), "--output-dir", str(output_dir), "--rollout-batch-size", "8",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--quiet", *extra]


def trainer_for(workspace, output_dir, *extra) -> LocalTrainer:
    run = parse_run(run_arguments(workspace, output_dir, *extra))
    return LocalTrainer(run.options, run.config)


def weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(workspace, tmp_path):
    ema = ("--self-distill-teacher", "ema")
    straight = trainer_for(workspace, tmp_path / "straight", "--num-rollout", "4", *ema)
    straight.run()
    first = trainer_for(workspace, tmp_path / "resumed", "--num-rollout", "4", "--save-interval", "2", *ema)
    first.num_rollout = 2  # stop after the checkpoint of rollout 2, as a preempted run would
    first.run()
    resumed = trainer_for(workspace, tmp_path / "resumed", "--num-rollout", "4", "--save-interval", "2", *ema)
    assert resumed.start_rollout == 2 and resumed.step == 4
    resumed.run()
    for name, value in weights(straight.student).items():
        torch.testing.assert_close(weights(resumed.student)[name], value, rtol=0, atol=0, msg=name)
    for name, value in straight.teacher.shadow.items():  # the EMA teacher too
        torch.testing.assert_close(resumed.teacher.shadow[name], value, rtol=0, atol=0, msg=name)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["rollout"] for line in lines] == [1, 2, 3, 4]  # each rollout once, after the resume too
    for name in ("loss", "self_distill_full_vocab_forward_kl"):
        expected = [json.loads(line)[name] for line in (tmp_path / "straight" / "metrics.jsonl").read_text()
                    .splitlines()]
        assert [line[name] for line in lines] == pytest.approx(expected, rel=1e-6)


def test_a_frozen_teacher_is_the_initial_checkpoint_after_a_resume(workspace, tmp_path):
    first = trainer_for(workspace, tmp_path, "--num-rollout", "2", "--self-distill-teacher", "frozen")
    initial = weights(first.student)
    first.run()
    assert any(not torch.equal(p, initial[n]) for n, p in weights(first.student).items())  # the student moved
    resumed = trainer_for(workspace, tmp_path, "--num-rollout", "3", "--self-distill-teacher", "frozen")
    assert resumed.start_rollout == 2
    for name, value in weights(resumed.teacher.model).items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


@pytest.mark.parametrize("interval", ["step", "rollout"])
def test_the_ema_teacher_is_an_fp32_average_written_after_each_rollout(interval):
    student = torch.nn.Linear(3, 2)
    initial = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    teacher = Teacher("ema", student, ema_rate=0.25, ema_interval=interval)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.after_optimizer_step()
    expected = {n: v + (0.25 if interval == "step" else 0.0) for n, v in initial.items()}
    for name, value in teacher.shadow.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected[name])
    for name, value in teacher.model.named_parameters():  # the teacher model changes only after the rollout
        torch.testing.assert_close(value.detach().double(), initial[name])
    teacher.after_rollout()
    expected = {n: v + 0.25 for n, v in initial.items()}
    for name, value in teacher.model.named_parameters():
        torch.testing.assert_close(value.detach().double(), expected[name])


def test_live_and_frozen_teachers():
    student = torch.nn.Linear(3, 2)
    assert Teacher("live", student).model is student
    frozen = Teacher("frozen", student)
    assert frozen.model is not student and not any(p.requires_grad for p in frozen.model.parameters())


def test_gradient_accumulation_gives_the_update_of_one_micro_batch(workspace, tmp_path):
    run = parse_run(run_arguments(workspace, tmp_path))
    trainer = LocalTrainer(run.options, run.config)
    samples = sample_rollout(trainer.student, trainer.tokenizer, trainer.rows, list(range(4)), run.options, 0, 0)
    data, _ = train_data_of(samples, run.options, run.config, trainer.tokenizer)
    spec = teacher_output_spec(trainer.student, run.config, 1.0)
    outputs = teacher_pass(trainer.teacher.model, data, spec, micro_batch_size=3)
    updates = []
    for micro_batch_size in (1, 2, 4):
        student = copy.deepcopy(trainer.student)
        before = weights(student)
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
        for per_token in (False, True):
            settings = StepSettings(1.0, per_token, micro_batch_size, clip_grad=0.0)
            optimizer_step(student, data, outputs, run.config, spec, settings, optimizer)
        updates.append({n: p - before[n] for n, p in weights(student).items()})
    for other in updates[1:]:
        for name, value in updates[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-7)
    assert any(value.abs().max() > 0 for value in updates[0].values())


def _first_of_group_succeeds(args, sample):
    return 1.0 if sample.index % 4 == 0 else 0.0


def test_the_sdpo_context_gives_the_failed_siblings_the_successful_response(workspace, tmp_path):
    run = parse_run(run_arguments(
        workspace, tmp_path, "--self-distill-teacher-context", "sdpo", "--n-samples-per-prompt", "4",
        "--custom-rm-path", f"{__name__}._first_of_group_succeeds", "--self-distill-dont-reprompt-on-self-success",
        "true"))
    trainer = LocalTrainer(run.options, run.config)
    samples = sample_rollout(trainer.student, trainer.tokenizer, trainer.rows, [0, 1], run.options, 0, 0)
    score(trainer.reward, run.options.slime_args(), samples)
    data, metrics = train_data_of(samples, run.options, run.config, trainer.tokenizer)
    views = data["prompt"]
    assert [v.has_teacher for v in views] == [False, True, True, True] * 2  # the success itself is not reprompted
    for group in range(2):
        solution = samples[4 * group].response
        for position in range(4 * group + 1, 4 * group + 4):
            teacher_text = trainer.tokenizer.decode(list(views[position].tokens[:views[position].prompt_length]))
            assert solution in teacher_text and samples[position].prompt.strip() in teacher_text
            assert list(views[position].tokens[views[position].prompt_length:]) == \
                samples[position].tokens[-samples[position].response_length:]
    assert metrics["success_group_fraction"] == 1.0


def test_the_self_revision_context_reads_the_attempt_twice(workspace, tmp_path):
    run = parse_run(run_arguments(workspace, tmp_path, "--self-distill-teacher-context", "self_revision",
                                  "--custom-rm-path", f"{__name__}._first_of_group_succeeds"))
    trainer = LocalTrainer(run.options, run.config)
    samples = sample_rollout(trainer.student, trainer.tokenizer, trainer.rows, [0, 1, 2, 3], run.options, 0, 0)
    score(trainer.reward, run.options.slime_args(), samples)
    data, _ = train_data_of(samples, run.options, run.config, trainer.tokenizer)
    for sample, view in zip(samples, data["prompt"]):
        response = sample.tokens[-sample.response_length:]
        assert list(view.tokens[:len(sample.tokens)]) == sample.tokens  # prompt, then the attempt
        assert list(view.tokens[-sample.response_length:]) == response  # the attempt again, distilled


def test_the_command_line_refuses_what_it_cannot_do(workspace, tmp_path, capsys):
    base = run_arguments(workspace, tmp_path)
    assert local_train.main([*base, "--no-such-flag", "1"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert local_train.main([*base, "--self-distill-rl-combination", "hybrid"]) == 2
    assert "policy loss" in capsys.readouterr().err
    assert local_train.main([*base, "--global-batch-size", "3"]) == 2
    assert "--global-batch-size" in capsys.readouterr().err
    assert local_train.main([*base, "--self-distill-teacher-context", "sdpo"]) == 2
    assert "--custom-rm-path" in capsys.readouterr().err


def test_cluster_only_flags_are_listed_as_not_applying(workspace, tmp_path):
    run = parse_run(run_arguments(workspace, tmp_path, "--tensor-model-parallel-size", "2", "--colocate"))
    assert run.not_applying == ["--tensor-model-parallel-size", "2", "--colocate"]


def test_a_run_writes_metrics_a_summary_and_a_plot(workspace, tmp_path, capsys):
    status = local_train.main(run_arguments(workspace, tmp_path, "--num-rollout", "2", "--eval-prompt-data",
                                            "heldout", str(workspace / "heldout.jsonl"), "--eval-interval", "1"))
    assert status == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout"] for r in records] == [0, 1, 2]
    assert {"eval/heldout/student_accuracy", "eval/heldout/teacher_accuracy"} <= set(records[0])
    assert {"loss", "self_distill_full_vocab_forward_kl", "grad_norm", "lr", "eval/heldout/student_accuracy"} <= \
        set(records[2])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"]["eval/heldout/student_accuracy"] == records[0]["eval/heldout/student_accuracy"]
    printed = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):  # the local and test extras install it
        assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no plot: matplotlib is not installed" in printed and not (tmp_path / "training.png").exists()
    assert "held-out exact-match accuracy" in printed
    assert (tmp_path / "checkpoints" / "latest").read_text() == "rollout_000002"


def test_every_online_recipe_runs_in_the_single_process_trainer():
    """Every recipe but offline top-K distillation (slime's SFT path): its settings and slime_args are understood."""
    for recipe in ("sdft.yaml", "sdft_topk.yaml", "sampled_token_reverse_kl.yaml", "opsd.yaml", "sdpo.yaml",
                   "sd_zero.yaml", "local_kv_demo.yaml"):
        run = parse_run(["--custom-config-path", os.path.join(os.path.dirname(RECIPE), recipe), "--hf-checkpoint",
                         "m", "--prompt-data", "d"])
        assert isinstance(run.config, SelfDistillConfig) and run.options.lr > 0
        assert all(flag.startswith(("--advantage-estimator", "--disable-")) for flag in run.not_applying
                   if flag.startswith("--")), (recipe, run.not_applying)


def test_a_resume_with_other_settings_is_refused(workspace, tmp_path):
    trainer_for(workspace, tmp_path, "--num-rollout", "1").run()
    with pytest.raises(ValueError, match="self_distill_kl_scope: 'full_vocab' -> 'sampled_token'"):
        trainer_for(workspace, tmp_path, "--num-rollout", "2", "--self-distill-kl-scope", "sampled_token")
    assert trainer_for(workspace, tmp_path, "--num-rollout", "2").start_rollout == 1  # more rollouts are fine


def test_sampling_ignores_the_checkpoint_generation_settings_and_reports_its_log_probs(workspace):
    from transformers import AutoModelForCausalLM

    from slime_self_distill.local.rollout import generate

    tokenizer = demo.demo_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    model.generation_config.top_k = 1  # a greedy-like checkpoint that never says a digit
    model.generation_config.suppress_tokens = digits
    prompt = tokenizer.encode("What is the code of 1 2 3 ?", add_special_tokens=False)
    results = generate(model, tokenizer, [prompt] * 32, max_new_tokens=4, temperature=1.5, generator_seed=0)
    assert len({tuple(ids) for ids, _, _ in results}) > 16  # top-k 1 would give one answer
    assert set(digits) & {token for ids, _, _ in results for token in ids}  # suppressed digits would never come
    assert model.generation_config.top_k == 1  # the checkpoint's settings are back
    for ids, log_probs, stopped in results:
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1] / 1.5
        expected = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(log_probs), expected, rtol=1e-4, atol=1e-4)
        assert stopped == (ids[-1] == tokenizer.eos_token_id)
