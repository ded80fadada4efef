"""The profile summary's arithmetic on hand-made traces: which events count as device work,
exclusive time under nesting, and busy time under overlap."""

import pytest

from nanogpt_jax.bench.profile import (
    busy_microseconds,
    device_events,
    exclusive_times,
    summarize,
    torch_device_events,
)


def names(pid, tid, process, thread):
    return [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": process}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}},
    ]


def op(name, ts, dur, pid=1, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_gpu_kernels_come_from_the_stream_lines():
    events = [
        *names(1, 1, "/device:GPU:0", "Stream #7(Compute)"),
        *names(1, 2, "/device:GPU:0", "XLA Ops"),  # the same work, labelled by HLO op
        *names(2, 3, "/host:CPU", "python"),
        op("gemv_kernel", 0, 5, 1, 1),
        op("fusion.3", 0, 5, 1, 2),
        op("generate", 0, 50, 2, 3),
    ]
    assert [e["name"] for e in device_events(events)] == ["gemv_kernel"]


def test_without_stream_lines_the_derived_lines_are_left_out():
    events = [
        *names(1, 1, "/device:GPU:0", "Compute"),
        *names(1, 2, "/device:GPU:0", "XLA Ops"),
        *names(1, 3, "/device:GPU:0", "XLA Modules"),
        op("gemv_kernel", 0, 5, 1, 1),
        op("fusion.3", 0, 5, 1, 2),
        op("jit_decode", 0, 9, 1, 3),
    ]
    assert [e["name"] for e in device_events(events)] == ["gemv_kernel"]


def test_cpu_ops_come_from_xla_threads_without_the_waiting():
    events = [
        *names(1, 1, "/host:CPU", "tf_XLAPjRtCpuClient/1"),
        *names(1, 2, "/host:CPU", "tf_XLAEigen/2"),
        *names(1, 3, "/host:CPU", "python"),
        op("dot.1", 0, 5, 1, 1),
        op("ThunkExecutor::Execute (wait for completion)", 0, 9, 1, 1),
        op("dot.1", 1, 3, 1, 2),
        op("PjitFunction(decode)", 0, 9, 1, 3),
    ]
    assert [(e["name"], e["tid"]) for e in device_events(events)] == [("dot.1", 1), ("dot.1", 2)]


def test_torch_traces_give_kernels_on_a_gpu_and_operators_on_a_cpu():
    cpu = [
        {**op("aten::linear", 0, 10), "cat": "cpu_op"},
        {**op("aten::addmm", 1, 8), "cat": "cpu_op"},
        {**op("generate", 0, 20), "cat": "python_function"},
    ]
    assert [e["name"] for e in torch_device_events(cpu)] == ["aten::linear", "aten::addmm"]
    gpu = [
        *cpu,
        {**op("gemv2T_kernel", 3, 4, pid=0, tid=7), "cat": "kernel"},
        {**op("Memcpy DtoH", 8, 1, pid=0, tid=7), "cat": "gpu_memcpy"},
    ]
    assert [e["name"] for e in torch_device_events(gpu)] == ["gemv2T_kernel", "Memcpy DtoH"]


def test_nested_ops_are_charged_to_the_innermost():
    # while.1 [0, 100) holds dot.2 [10, 40) and fusion.3 [50, 60), which holds dot.4 [52, 55)
    events = [
        op("while.1", 0, 100),
        op("dot.2", 10, 30),
        op("fusion.3", 50, 10),
        op("dot.4", 52, 3),
        op("dot.2", 120, 30),  # after the loop: at the top level again
    ]
    assert exclusive_times(events) == {
        "while.1": [60, 1],
        "dot.2": [60, 2],
        "fusion.3": [7, 1],
        "dot.4": [3, 1],
    }


def test_busy_time_counts_overlap_once():
    events = [op("a", 0, 10), op("b", 5, 10, tid=2), op("c", 30, 5), op("d", 31, 2, tid=3)]
    assert busy_microseconds(events) == 20


def test_summary_is_per_decode_step():
    events = [op("dot.1", 0, 4000), op("dot.2", 4000, 2000), op("end: dot.2", 6000, 1000)]
    summary = summarize(events, steps=2)
    assert summary["ops_per_step"] == 1.0  # a completion is not another op
    assert summary["busy_ms_per_step"] == pytest.approx(3.5)
    assert summary["top"] == [
        {"name": "dot.1", "ms_per_step": 2.0, "calls_per_step": 0.5, "share": pytest.approx(4 / 7)},
        {"name": "dot.2", "ms_per_step": 1.5, "calls_per_step": 0.5, "share": pytest.approx(3 / 7)},
    ]
    assert summary["top_kinds"] == [
        {"name": "dot", "ms_per_step": 3.5, "calls_per_step": 1.0, "share": pytest.approx(1.0)}
    ]
