"""The benchmarks still run (tiny sizes; their numbers are in the README, measured on the CI machine)."""

from argparse import Namespace

from benchmarks import bench_sdpo


def test_the_sdpo_rollout_benchmark_runs_and_builds_teachers(capsys):
    bench_sdpo.rollout_side(Namespace(groups=4, group_size=4, response_chars=300, repeats=1))
    out = capsys.readouterr().out
    assert "teacher views per rollout: static" in out and "ratio" in out
    given = int(out.split("SDPO gives ")[1].split()[0])
    assert 0 < given < 16  # some groups have a success to read, some none


def test_the_hidden_store_benchmark_runs_every_case(capsys):
    from benchmarks import bench_hidden_store

    bench_hidden_store.main(["--rows", "64", "--hidden", "16", "--vocab", "300", "--topk", "8", "--repeats", "1",
                             "--chunk-size", "16"])
    out = capsys.readouterr().out
    for case in ("full_vocab forward_kl", "full_vocab alpha_js", "topk student support", "topk union support",
                 "topk teacher support (stored top-K)"):
        assert case in out
    assert "teacher bytes/token 68" in out  # 16 fp32 values + the sampled token's log-prob


def test_the_offline_topk_benchmark_measures_extraction_storage_and_the_loss(capsys):
    from benchmarks import bench_offline_topk

    bench_offline_topk.main(["--rows", "4", "--response-words", "20", "--vocab", "500", "--hidden", "32", "--topk",
                             "4", "--loss-rows", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "x the plain full-logits forward" in out
    stored = float(out.split("file ")[1].split(" bytes per trained token")[0])
    assert 0 < stored <= 8 * 4 + 8 + 200  # tiny file: the footer is not amortised yet
    assert "x slime's sft_loss" in out or "loss: skipped, slime is not importable" in out
