#!/usr/bin/env python3
"""Hostile input from an independent client (Debian's python3-grpcio), issue 9 section 4.

Starts a real mesh (one expert worker, a router, a gateway; port 0, a temporary directory),
records a greedy generation, then sends malformed, oversized and out-of-range requests to
the public gateway and to the internal router and worker. Each must get the expected status
code within its deadline, with no internal address in the gateway's messages; afterwards
every process is alive with a bounded RSS, and the same greedy request returns the same
tokens as before.

  hostile_input_test.py --bin_dir build/bin --protos protos [--protoc protoc]
                        [--plugin grpc_python_plugin]
Exit status 0 on success; a message per failed check on stderr otherwise.
"""
import argparse
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

CALL_TIMEOUT = 30.0  # generous on a loaded 2-core machine; the answers take milliseconds
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)
    else:
        print("ok:", what)


def make_stubs(protos, protoc, plugin, out):
    os.makedirs(out, exist_ok=True)
    files = [os.path.join("moemesh/v1", f) for f in sorted(os.listdir(os.path.join(protos, "moemesh/v1")))
             if f.endswith(".proto")]
    subprocess.run([protoc, "-I", protos, "--python_out=" + out, "--grpc_python_out=" + out,
                    "--plugin=protoc-gen-grpc_python=" + plugin] + files, check=True)
    sys.path.insert(0, out)


def wait_port(path, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if os.path.exists(path):
            with open(path) as f:
                text = f.read().strip()
            if text:
                return int(text)
        time.sleep(0.05)
    raise RuntimeError(f"no port file {path}")


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def code_of(fn):
    """Runs fn(); returns (grpc.StatusCode, details, seconds)."""
    import grpc
    start = time.time()
    try:
        fn()
        return grpc.StatusCode.OK, "", time.time() - start
    except grpc.RpcError as e:
        return e.code(), e.details() or "", time.time() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin_dir", required=True)
    ap.add_argument("--protos", required=True)
    ap.add_argument("--protoc", default=shutil.which("protoc") or "protoc")
    ap.add_argument("--plugin", default=shutil.which("grpc_python_plugin") or "grpc_python_plugin")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="moemesh_hostile_")
    procs = []
    try:
        make_stubs(args.protos, args.protoc, args.plugin, os.path.join(work, "py"))
        import grpc
        from moemesh.v1 import expert_worker_pb2 as wpb, expert_worker_pb2_grpc as wgrpc
        from moemesh.v1 import gateway_pb2 as gpb, gateway_pb2_grpc as ggrpc
        from moemesh.v1 import router_pb2 as rpb, router_pb2_grpc as rgrpc
        from moemesh.v1 import tensor_pb2 as tpb

        model = os.path.join(work, "model")
        subprocess.run([os.path.join(args.bin_dir, "moemesh"), "make-model", "--out", model,
                        "--vocab", "256", "--hidden", "64", "--intermediate", "128", "--layers",
                        "2", "--heads", "4", "--kv_heads", "2", "--experts", "4", "--seed", "3"],
                       check=True, stdout=subprocess.DEVNULL)

        def start(name, binary, extra):
            port_file = os.path.join(work, name + ".port")
            log = open(os.path.join(work, name + ".log"), "w")
            p = subprocess.Popen([os.path.join(args.bin_dir, binary), "--model", model,
                                  "--port_file", port_file] + extra, stdout=log, stderr=log)
            procs.append((name, p))
            return p, wait_port(port_file, p)

        worker, wport = start("worker", "moemesh-expert-worker", ["--experts", "0-3"])
        router, rport = start("router", "moemesh-router", ["--groups", f"127.0.0.1:{wport}"])
        gateway, gport = start("gateway", "moemesh-gateway", ["--router", f"127.0.0.1:{rport}"])
        gw = ggrpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{gport}"))
        big = [("grpc.max_send_message_length", 64 << 20),
               ("grpc.max_receive_message_length", 64 << 20)]
        rt = rgrpc.RouterStub(grpc.insecure_channel(f"127.0.0.1:{rport}", options=big))
        wk = wgrpc.ExpertWorkerStub(grpc.insecure_channel(f"127.0.0.1:{wport}", options=big))

        def generate(req):
            return [t for r in gw.Generate(req, timeout=CALL_TIMEOUT) for t in r.token_ids]

        normal = gpb.GenerateRequest(prompt_tokens=gpb.TokenIds(ids=[5, 17, 42, 9]), max_tokens=12)
        before = generate(normal)
        check(len(before) == 12, "a normal greedy request returns 12 tokens")
        rss0 = {name: rss_bytes(p.pid) for name, p in procs}

        def f32(shape, values=None):
            n = 1
            for d in shape:
                n *= d
            data = struct.pack(f"<{n}f", *(values or [0.1] * n)) if n < (1 << 24) else b""
            return tpb.Tensor(dtype=tpb.DTYPE_F32, shape=shape, data=data)

        INV, RES = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
        NF = grpc.StatusCode.NOT_FOUND
        cases = [
            # The public gateway.
            ("gateway: no input", lambda: generate(gpb.GenerateRequest(max_tokens=4)), {INV}, True),
            ("gateway: max_tokens 0", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[1]), max_tokens=0)), {INV}, True),
            ("gateway: max_tokens negative", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[1]), max_tokens=-5)), {INV}, True),
            ("gateway: token id past the vocabulary", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[1, 1 << 30]), max_tokens=2)), {INV}, True),
            ("gateway: negative token id", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[-7]), max_tokens=2)), {INV}, True),
            ("gateway: empty prompt_tokens", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[]), max_tokens=2)), {INV}, True),
            ("gateway: negative temperature", lambda: generate(gpb.GenerateRequest(
                prompt_tokens=gpb.TokenIds(ids=[1]), max_tokens=2,
                sampling=gpb.SamplingParams(temperature=-1.0))), {INV}, True),
            ("gateway: 6 MiB message", lambda: generate(gpb.GenerateRequest(
                prompt="a" * (6 << 20), max_tokens=2)), {RES}, True),
            ("gateway: Score token past the vocabulary", lambda: gw.Score(
                gpb.ScoreRequest(tokens=[3, 999999]), timeout=CALL_TIMEOUT), {INV}, True),
            ("gateway: Score no tokens", lambda: gw.Score(
                gpb.ScoreRequest(tokens=[]), timeout=CALL_TIMEOUT), {INV}, True),
            # The internal router.
            ("router: layer 99", lambda: rt.Forward(rpb.ForwardRequest(
                layer=99, hidden=f32([1, 64])), timeout=CALL_TIMEOUT), {INV}, False),
            ("router: wrong width", lambda: rt.Forward(rpb.ForwardRequest(
                layer=0, hidden=f32([1, 63])), timeout=CALL_TIMEOUT), {INV}, False),
            ("router: shape larger than its data", lambda: rt.Forward(rpb.ForwardRequest(
                layer=0, hidden=tpb.Tensor(dtype=tpb.DTYPE_F32, shape=[1 << 30, 64],
                                           data=b"\0" * 256)), timeout=CALL_TIMEOUT), {INV}, False),
            ("router: huge dimensions", lambda: rt.Forward(rpb.ForwardRequest(
                layer=0, hidden=tpb.Tensor(dtype=tpb.DTYPE_F32, shape=[1 << 40, 1 << 40])),
                timeout=CALL_TIMEOUT), {INV}, False),
            ("router: unknown dtype", lambda: rt.Forward(rpb.ForwardRequest(
                layer=0, hidden=tpb.Tensor(dtype=77, shape=[1, 64], data=b"\0" * 256)),
                timeout=CALL_TIMEOUT), {INV}, False),
            ("router: FP8 output", lambda: rt.Forward(rpb.ForwardRequest(
                layer=0, hidden=f32([1, 64]), output_dtype=tpb.DTYPE_F8_E4M3),
                timeout=CALL_TIMEOUT), {INV}, False),
            # The internal worker.
            ("worker: a million duplicate assignments", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, tokens=f32([1, 64]), offsets=[0, 1000000],
                                      experts=[1] * 1000000, weights=[0.5] * 1000000),
                timeout=CALL_TIMEOUT), {INV}, False),
            ("worker: more experts per token than top-k", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, tokens=f32([1, 64]), offsets=[0, 3],
                                      experts=[0, 1, 2], weights=[0.3] * 3),
                timeout=CALL_TIMEOUT), {INV}, False),
            ("worker: expert out of range", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, tokens=f32([1, 64]), offsets=[0, 1],
                                      experts=[4], weights=[1.0]), timeout=CALL_TIMEOUT),
             {INV}, False),
            ("worker: offsets lie", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, tokens=f32([2, 64]), offsets=[0, 1 << 30, 1],
                                      experts=[1], weights=[1.0]), timeout=CALL_TIMEOUT),
             {INV}, False),
            ("worker: NaN weight", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, tokens=f32([1, 64]), offsets=[0, 1],
                                      experts=[1], weights=[float("nan")]), timeout=CALL_TIMEOUT),
             {INV}, False),
            ("worker: layer not held", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=57, tokens=f32([1, 64]), offsets=[0, 1],
                                      experts=[1], weights=[1.0]), timeout=CALL_TIMEOUT),
             {NF, INV}, False),
            ("worker: no tokens", lambda: wk.RunExperts(
                wpb.RunExpertsRequest(layer=0, offsets=[0]), timeout=CALL_TIMEOUT), {INV}, False),
        ]
        for name, fn, want, public in cases:
            code, details, took = code_of(fn)
            check(code in want, f"{name}: {code} ({details[:120]}) in {sorted(str(w) for w in want)}")
            check(took < CALL_TIMEOUT, f"{name}: answered within the deadline ({took:.2f} s)")
            if public:
                check("127.0.0.1:" not in details, f"{name}: no internal address in the message")

        # Garbage bytes where a message should be: the server cannot parse them.
        garbage = grpc.insecure_channel(f"127.0.0.1:{gport}").unary_unary(
            "/moemesh.v1.Gateway/Score", request_serializer=lambda b: b,
            response_deserializer=lambda b: b)
        code, details, _ = code_of(lambda: garbage(b"\xff\xff\xff\xff\x0f" * 64,
                                                   timeout=CALL_TIMEOUT))
        # gRPC's callback server answers an unparsable request before any handler runs (1.51
        # says UNIMPLEMENTED, older servers INTERNAL); what matters is a prompt, clean refusal.
        check(code in {grpc.StatusCode.INTERNAL, INV, grpc.StatusCode.UNIMPLEMENTED},
              f"gateway: garbage bytes: {code}")

        for name, p in procs:
            check(p.poll() is None, f"{name} is alive")
            grown = rss_bytes(p.pid) - rss0[name]
            check(grown < (256 << 20), f"{name} RSS grew {grown >> 20} MiB (< 256 MiB)")
        after = generate(normal)
        check(after == before, f"the same greedy tokens afterwards ({after} vs {before})")
    finally:
        for name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if failures:
            for name, _ in procs:
                log = os.path.join(work, name + ".log")
                if os.path.exists(log):
                    print(f"--- {name} log (tail) ---", file=sys.stderr)
                    with open(log) as f:
                        print("".join(f.readlines()[-20:]), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"{len(failures)} checks failed", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
