"""``tests.megatron_gpt.MegatronTinyGPT`` against its float64 brute force, in two gloo processes.

A packed batch of 3 sequences, made by slime's real ``get_batch`` (THD packing, zigzag context-parallel chunks,
padding), goes through the model at TP 1, TP 2 (sequence parallel on and off) and CP 2, tied and untied, with and
without an MTP head: every rank's logits [1, T_local, V/TP] equal, row for row and per TP shard, the brute-force
``sequence_logits`` of each unpacked sequence; the gradients of sum(logits * R) w.r.t. every parameter equal the
float64 brute force's (this rank's shard of the sharded ones). Also: the MTP heads' output-layer calls come before
the main one, the GPTModel structure (megatron-core's classes, shard shapes, tied weights, sequence-parallel slices),
and ``refresh_full_weights``. One spawn runs every case; the tests read its results.
"""

import io
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from tests.slime_support import requires_slime

pytestmark = [*requires_slime, pytest.mark.distributed]

VOCAB, HIDDEN, SEED, PAD_MULTIPLIER = 24, 8, 5, 4
SEQUENCE_LENGTHS, RESPONSE_LENGTH = (7, 13, 5), 2
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "cp2": (1, 2)}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.bfloat16: dict(rtol=0.05, atol=0.15)}


def _case(layout, *, sp=False, tied=False, mtp=0, dtype=torch.float32, backward=False, refresh=False):
    name = "-".join([layout, "sp" if sp else "nosp", "tied" if tied else "untied", f"mtp{mtp}",
                     str(dtype).removeprefix("torch."), "backward" if backward else "forward"] + ["refresh"] * refresh)
    return name, dict(layout=layout, sp=sp, tied=tied, mtp=mtp, dtype=dtype, backward=backward, refresh=refresh)


CASES = dict([
    *[_case("tp1", tied=tied, mtp=mtp) for tied in (False, True) for mtp in (0, 1)],
    _case("tp1", sp=True, mtp=1),  # sequence parallelism is off at TP 1
    *[_case("tp2", sp=sp, tied=tied, mtp=mtp) for sp in (False, True) for tied in (False, True) for mtp in (0, 1)],
    _case("tp2", sp=True, mtp=1, dtype=torch.float64),
    _case("tp2", sp=True, tied=True, mtp=1, dtype=torch.bfloat16),
    _case("cp2"),
    _case("cp2", tied=True, mtp=1),
    _case("tp1", mtp=1, backward=True),
    _case("tp2", sp=True, backward=True),
    _case("tp2", sp=True, tied=True, mtp=1, backward=True),
    _case("tp2", sp=False, mtp=1, backward=True),
    _case("cp2", tied=True, mtp=1, backward=True),
    *[_case("tp2", sp=True, tied=tied, refresh=True) for tied in (False, True)],
])
FORWARD_CASES = [name for name, case in CASES.items() if not case["backward"]]
BACKWARD_CASES = [name for name, case in CASES.items() if case["backward"]]
REFRESH_CASES = [name for name, case in CASES.items() if case["refresh"]]


# ---------------------------------------------------------------------- worker side
def _sequences():
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, VOCAB, (length,), generator=generator) for length in SEQUENCE_LENGTHS]


def _packed_batch(slime, sequences):
    """slime's get_batch on one micro-batch of the 3 sequences."""
    rollout = {
        "tokens": sequences,
        "total_lengths": [len(s) for s in sequences],
        "response_lengths": [RESPONSE_LENGTH] * len(sequences),
        "loss_masks": [torch.ones(RESPONSE_LENGTH, dtype=torch.int) for _ in sequences],
    }
    iterator = slime.data.DataIterator(rollout, [list(range(len(sequences)))])
    keys = ["tokens", "loss_masks", "total_lengths", "response_lengths"]
    return slime.model.get_batch(iterator, keys, PAD_MULTIPLIER, False)


def _local_positions(length, cp_size, cp_rank):
    """slime's layout, stated independently: a sequence is padded to a multiple of 2 cp chunks and CP rank r holds
    chunks r and 2 cp - 1 - r. Returns the padded length and this rank's positions in the padded sequence."""
    if cp_size == 1:
        return length, torch.arange(length)
    chunk = -(-length // (2 * cp_size))
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return 2 * cp_size * chunk, torch.cat([first, second])


def _reference_rows(model, sequences, cp_size, cp_rank, weights):
    """float64 brute force: this rank's rows [n, V] of the sequences' logits, in packed order (without the padding
    slime appends after the last sequence)."""
    rows = []
    for sequence in sequences:
        padded_length, positions = _local_positions(len(sequence), cp_size, cp_rank)
        padded = torch.cat([sequence, sequence.new_zeros(padded_length - len(sequence))])
        rows.append(model.sequence_logits(padded, torch.float64, weights)[positions])
    return torch.cat(rows)


def _run_case(slime, case, sequences):
    from megatron.core import mpu
    from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding

    from tests.megatron_gpt import MegatronTinyGPT

    tp_size, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    batch = _packed_batch(slime, sequences)
    model = MegatronTinyGPT(VOCAB, HIDDEN, seed=11, tied=case["tied"], sequence_parallel=case["sp"],
                            mtp_heads=case["mtp"], dtype=case["dtype"])
    calls = []
    model.output_layer.register_forward_hook(lambda module, args, output: calls.append((args[0].shape, output[0])))
    columns = slice(tp_rank * VOCAB // tp_size, (tp_rank + 1) * VOCAB // tp_size)

    def forward():
        return model(input_ids=batch["tokens"], position_ids=None, attention_mask=None, labels=None,
                     packed_seq_params=batch["packed_seq_params"], loss_mask=batch["full_loss_masks"])

    with torch.set_grad_enabled(case["backward"]):
        logits = forward()
    result = dict(
        shape=tuple(logits.shape), dtype=logits.dtype, local_tokens=batch["tokens"].size(1),
        output_layer_calls=len(calls),
        main_call_last=torch.equal(calls[-1][1].transpose(0, 1).to(logits.dtype), logits),
        output_layer_input_rows=[shape[0] for shape, _ in calls],
        sequence_parallel=model.output_layer.sequence_parallel,
        is_column_parallel=type(model.output_layer) is ColumnParallelLinear,
        is_vocab_parallel=type(model.embedding.word_embeddings) is VocabParallelEmbedding,
        output_weight_is_none=model.output_layer.weight is None,
        shared_is_embedding=model.shared_embedding_or_output_weight() is model.embedding.word_embeddings.weight,
        parameter_shapes={name: tuple(p.shape) for name, p in model.named_parameters()},
        state_dict_keys=sorted(model.state_dict()),
        flags=(model.pre_process, model.post_process, model.mtp_process, model.share_embeddings_and_output_weights),
        parameter_dtypes={p.dtype for p in model.parameters()},
    )
    reference_weights = model.full_weights(torch.float64)
    if case["tied"]:
        reference_weights["output"] = reference_weights["embedding"]
    rows = _reference_rows(model, sequences, cp_size, cp_rank, reference_weights if case["backward"] else None)
    n = len(rows)
    result["logits"] = (logits[0, :n].detach(), rows[:, columns].detach())
    if case["refresh"]:  # an optimizer step changed the weights: the brute force follows after refresh_full_weights
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.25)
            logits = forward()
            stale = _reference_rows(model, sequences, cp_size, cp_rank, None)
            model.refresh_full_weights()
            rows = _reference_rows(model, sequences, cp_size, cp_rank, None)
        result["stale_reference_differs"] = not torch.allclose(stale, rows)
        result["refreshed_logits"] = (logits[0, :n], rows[:, columns])
    if case["backward"]:
        generator = torch.Generator().manual_seed(99 + cp_rank)
        weights = torch.randn(logits.size(1), VOCAB, generator=generator, dtype=torch.float64)
        weights[n:] = 0  # the padding after the last sequence
        (logits[0] * weights[:, columns].to(logits.dtype)).sum().backward()
        for leaf in {id(w): w for w in reference_weights.values()}.values():
            leaf.requires_grad_(True)
        rows = _reference_rows(model, sequences, cp_size, cp_rank, reference_weights)
        (rows * weights[:n]).sum().backward()
        result["grads"] = {
            "embedding": (model.embedding.word_embeddings.weight.grad, reference_weights["embedding"].grad[columns]),
            "context": (model.decoder.context.grad, reference_weights["context"].grad),
            "norm": (model.decoder.final_layernorm.weight.grad, reference_weights["norm"].grad),
        }
        if not case["tied"]:
            result["grads"]["output"] = (model.output_layer.weight.grad, reference_weights["output"].grad[columns])
    return result


def _worker(rank, port, queue):
    try:
        from megatron.core import mpu

        from tests.slime_cpu_harness import destroy_gloo, import_slime_megatron, init_gloo, point_slime_at_cpu

        slime = import_slime_megatron()
        init_gloo(rank, 2, port, timeout_seconds=60)
        point_slime_at_cpu()
        sequences = _sequences()
        results = {}
        for layout, (tp_size, cp_size) in LAYOUTS.items():
            mpu.initialize_model_parallel(tensor_model_parallel_size=tp_size, context_parallel_size=cp_size)
            for name, case in CASES.items():
                if case["layout"] == layout:
                    results[name] = _run_case(slime, case, sequences)
            mpu.destroy_model_parallel()
        buffer = io.BytesIO()
        torch.save(results, buffer)  # tensors travel as bytes: a tensor shared through the queue dies with the worker
        queue.put((rank, buffer.getvalue()))
        destroy_gloo()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def results():
    from tests.slime_cpu_harness import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        outputs = dict(queue.get(timeout=240) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
    for rank, output in outputs.items():
        if isinstance(output, str):
            pytest.fail(f"rank {rank} failed:\n{output}")
    return {rank: torch.load(io.BytesIO(output), weights_only=False) for rank, output in outputs.items()}


@pytest.mark.parametrize("name", FORWARD_CASES + BACKWARD_CASES)
def test_logits_equal_brute_force_per_row_and_shard(results, name):
    case = CASES[name]
    tp_size = LAYOUTS[case["layout"]][0]
    for rank, by_case in results.items():
        result = by_case[name]
        assert result["shape"] == (1, result["local_tokens"], VOCAB // tp_size)
        assert result["dtype"] == (torch.float64 if case["dtype"] == torch.float64 else torch.float32)
        got, expected = result["logits"]
        assert len(expected) > 0.6 * result["local_tokens"]  # the rows compared: all but slime's trailing padding
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[case["dtype"]],
                                   msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("name", REFRESH_CASES)
def test_refreshed_full_weights_follow_changed_parameters(results, name):
    for rank, by_case in results.items():
        assert by_case[name]["stale_reference_differs"]
        got, expected = by_case[name]["refreshed_logits"]
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.float32],
                                   msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("name", BACKWARD_CASES)
def test_gradients_equal_brute_force_shard(results, name):
    case = CASES[name]
    expected_names = {"embedding", "context", "norm"} | (set() if case["tied"] else {"output"})
    for rank, by_case in results.items():
        grads = by_case[name]["grads"]
        assert set(grads) == expected_names
        for parameter, (got, expected) in grads.items():
            assert got is not None, f"rank {rank}: no gradient for {parameter}"
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4,
                                       msg=lambda m: f"rank {rank} {parameter}: {m}")


def test_mtp_heads_call_the_output_layer_first_and_the_main_head_last(results):
    for by_case in results.values():
        for name in FORWARD_CASES:
            result, case = by_case[name], CASES[name]
            assert result["output_layer_calls"] == 1 + case["mtp"]
            assert result["main_call_last"], name


def test_megatron_structure(results):
    for rank, by_case in results.items():
        for name in FORWARD_CASES:
            result, case = by_case[name], CASES[name]
            tp_size = LAYOUTS[case["layout"]][0]
            local_tokens = result["local_tokens"]
            assert result["is_column_parallel"] and result["is_vocab_parallel"]
            assert result["flags"] == (True, True, False, case["tied"])
            assert result["parameter_dtypes"] == {case["dtype"]}
            # sequence parallelism: the output layer gets this TP rank's slice of the sequence
            assert result["sequence_parallel"] == (case["sp"] and tp_size > 1)
            rows = local_tokens // tp_size if result["sequence_parallel"] else local_tokens
            assert result["output_layer_input_rows"] == [rows] * (1 + case["mtp"])
            # tied: no output weight of its own; GPTModel's shared_embedding_or_output_weight() is the embedding
            # weight on a stage with the embedding, tied or not
            assert result["output_weight_is_none"] == case["tied"]
            assert result["shared_is_embedding"]
            shapes = {"embedding.word_embeddings.weight": (VOCAB // tp_size, HIDDEN),
                      "decoder.context": (VOCAB, HIDDEN), "decoder.final_layernorm.weight": (HIDDEN,)}
            if not case["tied"]:
                shapes["output_layer.weight"] = (VOCAB // tp_size, HIDDEN)
            assert result["parameter_shapes"] == shapes, f"rank {rank} {name}"
            # the full weights stay out of the parameters and the state dict
            assert result["state_dict_keys"] == sorted(list(shapes) + ["output_layer._extra_state"])
