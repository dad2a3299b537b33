"""SD-Zero phase 1 collection (slime_self_distill.sd_zero_collect) against slime's real generate / GenerateState /
async_rm / generate_rollout, with a small HTTP server on 127.0.0.1 standing in for the SGLang router."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import threading
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slime_self_distill import sd_zero_collect
from slime_self_distill.data.sd_zero_split import main as split_main
from slime_self_distill.sd_zero_collect import SdZeroCollectError, append_rows, load_collection
from tests.slime_support import needs_slime
from tests.tokenizer_factory import make_tokenizer, save_tokenizer

WRONG = "Wait, this response is wrong. Let me correct it."
RIGHT = "Let me rephrase the above solution."
TIMEOUT_S = 30


# ------------------------------------------------------------------------------------------- fake router
class FakeRouter:
    """Answers /generate like SGLang (text, meta_info with output_token_logprobs and finish_reason): a first attempt
    at a problem containing "easy" is right (\\boxed{42}), otherwise wrong (\\boxed{7}); a revision (its input
    contains a revision phrase) is right, wrong, right, right, wrong, right... in the order the revisions of
    one revision input arrive. Serves
    at most ``max_requests`` requests, then shuts itself down."""

    def __init__(self, tokenizer, max_requests: int = 200):
        self.tokenizer = tokenizer
        self.max_requests = max_requests
        self.generate_texts: list = []  # decoded input of every /generate request, in arrival order
        self.payloads: list = []
        self.revision_counts: dict = {}
        self.lock = threading.Lock()
        self.requests = 0
        router = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of a router

            def log_message(self, *args):
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                router._count()

            def do_GET(self):
                if self.path.startswith("/workers"):
                    self._reply({"workers": [{"url": router.url}]})
                else:  # /v1/loads
                    self._reply({"num_reqs": 0})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/generate":
                    self._reply(router.generate(payload))
                else:  # /abort_request
                    self._reply({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _count(self) -> None:
        with self.lock:
            self.requests += 1
            if self.requests >= self.max_requests:
                threading.Thread(target=self.server.shutdown, daemon=True).start()

    def generate(self, payload: dict) -> dict:
        text = self.tokenizer.decode(payload["input_ids"])
        with self.lock:
            self.generate_texts.append(text)
            self.payloads.append(payload)
            if WRONG in text or RIGHT in text:
                n = self.revision_counts.get(text, 0)
                self.revision_counts[text] = n + 1
                answer = "Still \\boxed{5}" if n % 3 == 1 else "Fixed: \\boxed{42}"
            else:
                answer = "So \\boxed{42}" if "easy" in text else "So \\boxed{7}"
        ids = self.tokenizer.encode(answer, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return {"text": answer + self.tokenizer.eos_token,
                "meta_info": {"output_token_logprobs": [[-0.5, i] for i in ids],
                              "finish_reason": {"type": "stop", "matched": self.tokenizer.eos_token_id},
                              "prompt_tokens": len(payload["input_ids"]), "completion_tokens": len(ids),
                              "cached_tokens": 0}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def router():
    r = FakeRouter(make_tokenizer())
    yield r
    r.close()


def make_args(tokenizer_dir, router, tmp_path, **overrides) -> Namespace:
    host, port = router.url[len("http://"):].split(":")
    values = dict(
        hf_checkpoint=tokenizer_dir, sglang_router_ip=host, sglang_router_port=int(port), rollout_num_gpus=1,
        rollout_num_gpus_per_engine=1, sglang_server_concurrency=8, sglang_dp_size=None, use_distributed_post=False,
        rollout_temperature=1.0, rollout_top_p=0.9, rollout_top_k=-1, rollout_max_response_len=64, rollout_stop=None,
        rollout_stop_token_ids=None, rollout_skip_special_tokens=False, n_samples_per_prompt=2, rollout_batch_size=2,
        over_sampling_batch_size=2, rollout_global_dataset=True, ci_test=False, use_rollout_routing_replay=False,
        partial_rollout=False, mask_offpolicy_in_partial_rollout=False, group_rm=False, custom_rm_path=None,
        rm_type="math", reward_key=None, dynamic_sampling_filter_path=None, rollout_sample_filter_path=None,
        rollout_all_samples_process_path=None, rollout_sample_hook_path=None,
        custom_generate_function_path="slime_self_distill.sd_zero_collect.generate_with_revision",
        self_distill_revision_output=str(tmp_path / "collect" / "tuples.jsonl"), self_distill_revision_target=6000,
        self_distill_revisions_per_attempt=3,
        debug_rollout_only=True,
    )
    values.update(overrides)
    return Namespace(**values)


@pytest.fixture
def slime_env():
    """slime's generation state is a process-wide singleton: a fresh one per test; the plugin's collections too."""
    from slime.rollout.sglang_rollout import GenerateState
    from slime.utils.misc import SingletonMeta

    SingletonMeta._instances.pop(GenerateState, None)
    sd_zero_collect.reset_collections()
    yield
    SingletonMeta._instances.pop(GenerateState, None)
    sd_zero_collect.reset_collections()


def on_slime_loop(coro):
    """Run on slime's background event loop (its HTTP client lives there), never longer than TIMEOUT_S."""
    from slime.utils.async_utils import get_async_loop

    return asyncio.run_coroutine_threadsafe(coro, get_async_loop().loop).result(timeout=TIMEOUT_S)


def with_timeout(fn, *args, **kwargs):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=TIMEOUT_S)


def rendered(problem: str) -> str:
    return make_tokenizer().apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                                add_generation_prompt=True)


def make_sample(problem: str, index: int = 0, label="42", raw=None):
    from slime.utils.types import Sample

    metadata = {"self_distill": {"student_prompt": raw}} if raw is not None else {}
    return Sample(index=index, group_index=index, prompt=rendered(problem), label=label, metadata=metadata)


def start(args):
    from slime.utils.http_utils import init_http_client

    init_http_client(args)


def collect_one(args, sample):
    from slime.rollout.sglang_rollout import GenerateState

    params = copy.deepcopy(GenerateState(args).sampling_params)
    return on_slime_loop(sd_zero_collect.generate_with_revision(args, sample, params))


# ----------------------------------------------------------------------------------------- per sample
@needs_slime
def test_wrong_first_attempt_is_revised_with_the_exact_continuation(tokenizer_dir, router, tmp_path, slime_env):
    args = make_args(tokenizer_dir, router, tmp_path)
    start(args)
    raw = [{"role": "user", "content": "hard problem"}]
    sample = collect_one(args, make_sample("hard problem", raw=raw))

    assert sample.response == "So \\boxed{7}<|im_end|>" and sample.reward == 0  # graded by slime's math reward
    assert len(router.generate_texts) == 4  # y_init + 3 revisions
    expected = rendered("hard problem") + "So \\boxed{7}" + f"\n\n{WRONG}\n\n"  # no end token between y_init and P_r
    assert router.generate_texts[1:] == [expected] * 3
    for payload in router.payloads[1:]:  # a fresh copy of the sampling params for each revision
        assert payload["sampling_params"]["max_new_tokens"] == 64
        assert payload["sampling_params"]["top_p"] == 0.9 and payload["sampling_params"]["temperature"] == 1.0
    plugin = sample.metadata["self_distill"]
    tuples = plugin["sd_zero_tuples"]
    assert len(tuples) == 2  # right, wrong, right: only the verified ones
    assert {t["y_revised"] for t in tuples} == {"Fixed: \\boxed{42}"}
    assert tuples[0]["prompt"] == raw and tuples[0]["p_r"] == WRONG and tuples[0]["y_init"] == "So \\boxed{7}"
    assert tuples[0]["y_init_correct"] is False and tuples[0]["y_init_reward"] == 0
    assert tuples[0]["y_revised_reward"] == 1 and tuples[0]["label"] == "42"
    assert plugin["sd_zero_counts"] == {"y_init_correct": False, "revised": True, "revisions_sampled": 3,
                                        "revisions_correct": 2, "revisions_aborted": 0}


@needs_slime
def test_correct_first_attempt_is_revised_only_when_asked(tokenizer_dir, router, tmp_path, slime_env):
    args = make_args(tokenizer_dir, router, tmp_path)
    start(args)
    sample = collect_one(args, make_sample("easy problem"))
    assert sample.reward == 1 and len(router.generate_texts) == 1
    assert sample.metadata["self_distill"]["sd_zero_tuples"] == []
    assert sample.metadata["self_distill"]["sd_zero_counts"]["revised"] is False

    args = make_args(tokenizer_dir, router, tmp_path, self_distill_revise_correct=True,
                     self_distill_revisions_per_attempt=2)
    sample = collect_one(args, make_sample("easy problem"))
    assert router.generate_texts[2:] == [rendered("easy problem") + f"So \\boxed{{42}}\n\n{RIGHT}\n\n"] * 2
    tuples = sample.metadata["self_distill"]["sd_zero_tuples"]
    assert len(tuples) == 1 and tuples[0]["y_init_correct"] is True and tuples[0]["p_r"] == RIGHT
    assert tuples[0]["prompt"] == rendered("easy problem")  # no raw prompt recorded: slime's prompt


@needs_slime
def test_evaluation_generates_the_first_attempt_only(tokenizer_dir, router, tmp_path, slime_env):
    from slime.rollout.sglang_rollout import GenerateState

    args = make_args(tokenizer_dir, router, tmp_path)
    start(args)
    params = copy.deepcopy(GenerateState(args).sampling_params)
    sample = on_slime_loop(sd_zero_collect.generate_with_revision(args, make_sample("hard problem"), params,
                                                                  evaluation=True))
    assert len(router.generate_texts) == 1 and sample.reward is None  # slime grades it


async def not_a_number(args, sample, **kwargs):
    return "yes"


async def a_dict(args, sample, **kwargs):
    return {"acc": 1.0}


@needs_slime
def test_errors_name_the_sample(tokenizer_dir, router, tmp_path, slime_env):
    args = make_args(tokenizer_dir, router, tmp_path)
    start(args)
    with pytest.raises(SdZeroCollectError, match=r"index=0.*has no label, but --rm-type math"):
        collect_one(args, make_sample("hard problem", label=None))
    assert router.generate_texts == []  # refused before generating

    args = make_args(tokenizer_dir, router, tmp_path, custom_rm_path=f"{__name__}.not_a_number")
    with pytest.raises(SdZeroCollectError, match=r"first attempt of sample index=0.*'yes' is not a number"):
        collect_one(args, make_sample("hard problem"))
    args = make_args(tokenizer_dir, router, tmp_path, custom_rm_path=f"{__name__}.a_dict")
    with pytest.raises(SdZeroCollectError, match=r"reward is a dict.*--reward-key"):
        collect_one(args, make_sample("hard problem"))

    args = make_args(tokenizer_dir, router, tmp_path, self_distill_revision_output=None)
    with pytest.raises(SdZeroCollectError, match="--self-distill-revision-output is not set"):
        sd_zero_collect.generate_rollout(args, 0, None)


# ------------------------------------------------------------------------------------------- rollouts
class PromptSource:
    """slime's data source interface: groups of n_samples_per_prompt samples; the kinds of problem in turn, each
    problem a new one."""

    def __init__(self, args, problems):
        self.args, self.problems, self.next = args, problems, 0

    def get_samples(self, n):
        groups = []
        for _ in range(n):
            problem = f"{self.problems[self.next % len(self.problems)]} problem {self.next}"
            group = [make_sample(problem, index=self.next * self.args.n_samples_per_prompt + j)
                     for j in range(self.args.n_samples_per_prompt)]
            for sample in group:
                sample.group_index = self.next
            groups.append(group)
            self.next += 1
        return groups

    def add_samples(self, groups):
        pass


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@needs_slime
def test_rollouts_write_resume_and_stop_at_the_target(tokenizer_dir, router, tmp_path, slime_env, capsys):
    # each rollout: 2 groups x 2 samples; "hard" samples are revised 3 times with 2 kept tuples each
    args = make_args(tokenizer_dir, router, tmp_path, self_distill_revision_target=10)
    start(args)
    source = PromptSource(args, ["hard", "easy"])
    output = with_timeout(sd_zero_collect.generate_rollout, args, 0, source)
    rows = read_jsonl(args.self_distill_revision_output)
    assert len(rows) == 4 and {r["rollout_id"] for r in rows} == {0}
    assert set(rows[0]) >= {"prompt", "label", "y_init", "p_r", "y_revised", "y_init_correct", "y_revised_correct",
                            "y_init_reward", "y_revised_reward", "rollout_id"}
    assert output.metrics["rollout/sd_zero/samples"] == 4 and output.metrics["rollout/sd_zero/revised"] == 2
    assert output.metrics["rollout/sd_zero/revisions_sampled"] == 6
    assert output.metrics["rollout/sd_zero/kept"] == 4 and output.metrics["rollout/sd_zero/total_kept"] == 4
    assert output.metrics["rollout/sd_zero/target_reached"] == 0

    # a new process resumes from the file: it counts what is there, and cuts the batch at the target
    sd_zero_collect.reset_collections()
    with_timeout(sd_zero_collect.generate_rollout, args, 1, source)
    assert len(read_jsonl(args.self_distill_revision_output)) == 8
    output = with_timeout(sd_zero_collect.generate_rollout, args, 2, source)
    rows = read_jsonl(args.self_distill_revision_output)
    assert len(rows) == 10 and rows[:8] == read_jsonl(args.self_distill_revision_output)[:8]
    assert [r["rollout_id"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 2
    assert output.metrics["rollout/sd_zero/kept"] == 2 and output.metrics["rollout/sd_zero/target_reached"] == 1

    # target reached: later rollouts generate nothing (the run goes on to --num-rollout)
    requests = len(router.generate_texts)
    assert with_timeout(sd_zero_collect.generate_rollout, args, 3, source) is output
    assert len(router.generate_texts) == requests and len(read_jsonl(args.self_distill_revision_output)) == 10

    # the split reads the file
    code = split_main(["--input", args.self_distill_revision_output, "--output-dir", str(tmp_path / "sft"),
                       "--stage2-size", "1", "--quiet", "--no-clean"])
    assert code == 0, capsys.readouterr().err
    assert "duplicates dropped (same x, y_init, y_revised): 7" in capsys.readouterr().out  # 2 revisions alike
    stage1 = read_jsonl(tmp_path / "sft" / "stage1_generation.jsonl")
    assert len(stage1) == 2
    assert stage1 and stage1[0]["messages"][-1]["content"] == f"So \\boxed{{7}}\n\n{WRONG}\n\nFixed: \\boxed{{42}}"


@needs_slime
def test_resumed_collection_at_target_does_not_revise(tokenizer_dir, router, tmp_path, slime_env):
    args = make_args(tokenizer_dir, router, tmp_path, self_distill_revision_target=1)
    start(args)
    os.makedirs(os.path.dirname(args.self_distill_revision_output))
    append_rows(load_collection(args.self_distill_revision_output, 1), [tuple_row()])
    source = PromptSource(args, ["hard"])
    output = with_timeout(sd_zero_collect.generate_rollout, args, 5, source)
    assert len(router.generate_texts) == 4  # the first attempts only: no revision once the target is reached
    assert output.metrics["rollout/sd_zero/revised"] == 0 and len(read_jsonl(args.self_distill_revision_output)) == 1
    assert with_timeout(sd_zero_collect.generate_rollout, args, 6, source) is output


# ------------------------------------------------------------------------------------------- the file
def tuple_row(n=0):
    return {"prompt": f"problem {n}", "label": "1", "y_init": "a", "p_r": WRONG, "y_revised": "b",
            "y_init_correct": False, "y_revised_correct": True, "y_init_reward": 0, "y_revised_reward": 1,
            "rollout_id": 0}


def test_load_refuses_a_file_of_another_format_naming_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(tuple_row()) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(SdZeroCollectError, match=r"t.jsonl' line 2: \[missing_key\].*not a file of this collection"):
        load_collection(str(path), 10)
    path.write_text(json.dumps(tuple_row()) + "\n{not json\n")
    with pytest.raises(SdZeroCollectError, match=r"line 2: \[unparseable_json\]"):
        load_collection(str(path), 10)
    path.write_text(json.dumps({**tuple_row(), "y_revised_correct": False}) + "\n")
    with pytest.raises(SdZeroCollectError, match=r"line 1: 'y_revised_correct' is false"):
        load_collection(str(path), 10)


def test_load_counts_and_truncates_to_the_target(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(tuple_row(n)) for n in range(5)))  # no final newline
    collection = load_collection(str(path), 10)
    assert collection.count == 5 and not collection.done
    assert append_rows(collection, [tuple_row(5), tuple_row(6)]) == 2
    assert [r["prompt"] for r in read_jsonl(path)] == [f"problem {n}" for n in range(7)]
    collection = load_collection(str(path), 3)
    assert collection.count == 3 and collection.done
    assert [r["prompt"] for r in read_jsonl(path)] == ["problem 0", "problem 1", "problem 2"]
    assert append_rows(collection, [tuple_row(9)]) == 0


def test_append_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    collection = load_collection(str(path), 10)
    append_rows(collection, [tuple_row(0)])
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        append_rows(collection, [tuple_row(1)])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.jsonl"]  # no torn line, no leftover
    assert collection.count == 1


@needs_slime
def test_a_collection_run_records_raw_prompts_and_needs_no_teacher_prompt(tmp_path, monkeypatch, capsys):
    """The plugin's data source in a collection run (the static context's default): rows without a teacher prompt
    are fine, each sample carries its row's raw messages for the tuple's prompt; the launcher's row check agrees."""
    from slime_self_distill.data_source import PLUGIN_METADATA_KEY, STUDENT_PROMPT_KEY
    from tests.test_data_source import data_source_args, self_distill_data_source
    from tests.test_train import check_only

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
             "label": "4"}]
    output = str(tmp_path / "tuples.jsonl")
    source = self_distill_data_source(data_source_args(tmp_path, rows=rows, self_distill_revision_output=output))
    (group,) = source.get_samples(1)
    for sample in group:
        assert sample.metadata[PLUGIN_METADATA_KEY] == {STUDENT_PROMPT_KEY: rows[0]["prompt"]}
    data = tmp_path / "rows.jsonl"
    assert check_only(monkeypatch, "--prompt-data", data, "--label-key", "label", "--apply-chat-template",
                      "--self-distill-revision-output", output) == 0
    assert "1 rows OK; an SD-Zero collection: no teacher prompt is read" in capsys.readouterr().out
