"""kernels/: every backend that runs on this machine against the plain-PyTorch references in us_jepa.py.

On a CPU machine: cpp (the C++ extension, JIT-built once per session) and triton (under TRITON_INTERPRET=1,
set in conftest.py). On a GPU machine the same tests also run cuda and triton on the GPU."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.nn.functional as F

import kernels
import us_jepa as U

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(b, d) for d in DEVICES for b in kernels.BACKENDS if kernels.why_not(b, d) is None]
# shapes (M, B, N, K, D): D not a power of two, K = 1, B = 1, N not a multiple of any block size, D > 64
SHAPES = [(4, 3, 36, 5, 24), (1, 1, 7, 1, 5), (2, 5, 13, 9, 33), (3, 2, 196, 18, 96)]


def backend_ids(c): return f"{c[0]}-{c[1]}"


@pytest.fixture(scope="module", params=CASES, ids=backend_ids)
def ops(request):
    name, device = request.param
    return kernels.get(name, device), device


def test_expected_backends_are_available():
    """Guards against a silent skip: the C++ extension must build; Triton must run (in the interpreter on a CPU
    machine); on a GPU machine the CUDA extension must build too."""
    expected = [("cpp", "cpu")] + ([("cuda", "cuda"), ("triton", "cuda")] if "cuda" in DEVICES else [("triton", "cpu")])
    for name, device in expected:
        assert (name, device) in CASES, kernels.why_not(name, device)


def make_idx(M, B, N, K, g, device, dup=True):
    """Target-like indices: unique within a mask, repeated across masks (dup=True forces overlaps)."""
    idx = torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]) for _ in range(M)])
    if dup and M > 1: idx[1] = idx[0]  # whole masks repeat: every row of mask 0 is hit twice
    return idx.to(device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded"])
def test_masked_gather_forward_backward(ops, shape, layout):
    (o, device), (M, B, N, K, D) = ops, shape
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, D, N, generator=g).to(device).transpose(1, 2)  # (B, N, D), strided
    if layout == "contiguous": base = base.contiguous()
    if layout == "expanded": base = base[:1].contiguous()  # (1, N, D), used expanded: stride 0 over the batch
    view = (lambda t: t.expand(B, -1, -1)) if layout == "expanded" else (lambda t: t)  # like the predictor's positions
    br, bk = (base.detach().clone().requires_grad_() for _ in range(2))
    x = view(bk)
    assert {"contiguous": x.is_contiguous(), "transposed": x.stride(2) != 1, "expanded": x.stride(0) == 0 or B == 1}[layout]
    idx = make_idx(M, B, N, K, g, device)
    ref, out = U.apply_masks(view(br), idx), o.masked_gather(x, idx)
    assert out.shape == ref.shape == (M * B, K, D) and torch.equal(out, ref)  # a copy: bit-exact
    w = torch.randn(ref.shape, generator=g).to(device)
    (ref * w).sum().backward(); (out * w).sum().backward()
    torch.testing.assert_close(bk.grad, br.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,beta", [("smooth_l1", 1.0), ("smooth_l1", 0.3), ("smooth_l1", 0.0), ("l1", 1.0),
                                       ("l2", 1.0)])
def test_salt_loss_forward_backward(ops, shape, kind, beta):
    (o, device), (M, B, N, K, D) = ops, shape
    g = torch.Generator().manual_seed(1)
    feats = (torch.randn(B, N, D, generator=g) * 3 + 2).to(device)  # a mean far from 0: the LN must remove it
    idx = make_idx(M, B, N, K, g, device)
    pred = torch.randn(M * B, K, D, generator=g).to(device)
    pr, pk = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ref, out = U.salt_loss(pr, feats, idx, kind, beta), o.salt_loss(pk, feats, idx, kind, beta)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (ref * 2.5).backward(); (out * 2.5).backward()  # a non-unit upstream gradient must scale the fused one
    torch.testing.assert_close(pk.grad, pr.grad, rtol=1e-5, atol=1e-7)


def exact_salt(pred, feats, idx, kind="smooth_l1", beta=1.0):
    """The reference math in float64 (us_jepa.salt_loss computes in float32)."""
    t = F.layer_norm(U.apply_masks(feats.double(), idx), feats.shape[-1:])
    fn = {"smooth_l1": lambda a, b: F.smooth_l1_loss(a, b, beta=beta), "l1": F.l1_loss, "l2": F.mse_loss}[kind]
    return fn(pred.double(), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_reference_error(ops, dtype):
    """The flash-attention rule: the kernel's error in dtype <= 2x the reference's error in dtype, both against
    the math in float64 on the same rounded inputs; for the loss, its gradient and the gather's gradient."""
    o, device = ops
    M, B, N, K, D = 4, 3, 36, 5, 48
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(B, N, D, generator=g).to(device, dtype)
    pred = torch.randn(M * B, K, D, generator=g).to(device, dtype)
    w = torch.randn(M * B, K, D, generator=g).to(device, dtype)
    idx = make_idx(M, B, N, K, g, device)

    def results(loss_fn, gather_fn, cast):
        p, x = cast(pred).requires_grad_(), cast(feats).requires_grad_()
        loss = loss_fn(p, cast(feats), idx)
        loss.backward()
        (gather_fn(x, idx) * cast(w)).sum().backward()
        return loss.double(), p.grad.double(), x.grad.double()

    exact = results(exact_salt, U.apply_masks, lambda t: t.double())
    ref = results(U.salt_loss, U.apply_masks, lambda t: t.clone())
    ker = results(o.salt_loss, o.masked_gather, lambda t: t.clone())
    for name, e, r, k in zip(("loss", "grad_pred", "grad_x"), exact, ref, ker):
        err_ref, err_ker = ((r - e).norm() / e.norm()).item(), ((k - e).norm() / e.norm()).item()
        assert err_ker <= 2 * err_ref + 1e-7, (name, err_ker, err_ref)


@pytest.mark.parametrize("op", ["gather", "gather_backward", "salt"])
@pytest.mark.parametrize("bad", [-1, 36])
def test_out_of_range_index_raises(ops, op, bad, monkeypatch):
    o, device = ops
    if device == "cuda":  # CUDA inputs are range-checked on the host only on request (a sync)
        monkeypatch.setenv(kernels.CHECK_ENV, "1")
    x, pred = torch.randn(2, 36, 8, device=device), torch.randn(4, 3, 8, device=device)
    idx = torch.zeros(2, 2, 3, dtype=torch.long, device=device)
    idx[1, 1, 2] = bad
    with pytest.raises((RuntimeError, IndexError), match="out of range"):
        if op == "gather": o.masked_gather(x, idx)
        elif op == "salt": o.salt_loss(pred, x, idx)
        else: namespace(o).masked_gather_backward(pred, idx, 36)


def test_check_indices():
    """The check the training loop runs once a step on the CPU indices, before they go to a GPU."""
    idx = torch.tensor([[[0, 5], [35, 2]]])
    kernels.check_indices(idx, 36)
    kernels.check_indices(idx.int(), 36)
    kernels.check_indices(torch.empty(0, 2, 0, dtype=torch.long), 0)
    for bad in (-1, 36):
        with pytest.raises(IndexError, match=r"out of range.*\[0, 36\)"):
            kernels.check_indices(torch.tensor([[[0, bad]]]), 36)
    with pytest.raises(ValueError, match="integer"):
        kernels.check_indices(idx.float(), 36)
    with pytest.raises(ValueError, match="sync"):  # on a device it would read back: refused
        kernels.check_indices(idx.to("meta"), 36)


def test_host_checks_indices_on_cpu_always_elsewhere_on_request(monkeypatch):
    monkeypatch.delenv(kernels.CHECK_ENV, raising=False)
    assert kernels.host_checks_indices(torch.zeros(1, dtype=torch.long))
    assert not kernels.host_checks_indices(torch.zeros(1, dtype=torch.long, device="meta"))
    monkeypatch.setenv(kernels.CHECK_ENV, "1")
    assert kernels.host_checks_indices(torch.zeros(1, dtype=torch.long, device="meta"))


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on each op that makes the host wait for the device: reading a value back (.item(),
    bool(), .tolist() end in aten._local_scalar_dense) or copying a CUDA tensor to the CPU."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError(f"a host sync: {func} reads a value back")
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves((args, kwargs)))
        if on_cuda and any(isinstance(t, torch.Tensor) and t.is_cpu for t in leaves(out)):
            raise AssertionError(f"a host sync: {func} copies a CUDA tensor to the CPU")
        return out


class LaunchStub:
    """Stands for a @triton.jit kernel: `kernel[grid](*args)` counts the launch, runs nothing."""
    def __init__(self): self.launches = 0
    def __getitem__(self, grid): return self
    def __call__(self, *args, **kwargs): self.launches += 1


@pytest.mark.skipif(kernels.why_not("triton", "cpu") is not None and not torch.cuda.is_available(),
                    reason="triton is not importable here")
def test_triton_host_code_does_not_sync_on_cuda(monkeypatch):
    """The host side of the triton ops (and kernels.Ops around it), run on fake CUDA tensors
    (FakeTensorMode: no GPU needed, and no data to read back) with the launches stubbed, makes no
    device->host sync. Self-check: with US_JEPA_CHECK_INDICES=1, which asks for the synchronising
    host check, the same run must fail."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from kernels import triton_ops as T
    names = ("_gather_kernel", "_scatter_add_kernel", "_salt_kernel")
    stubs = {name: LaunchStub() for name in names}
    for name, stub in stubs.items():
        monkeypatch.setattr(T, name, stub)
    o = kernels.Ops("triton", T.gather_impl, T.salt_loss_impl)

    def run():
        with FakeTensorMode(), NoHostSync():
            x = torch.empty(3, 13, 24, device="cuda")
            idx = torch.empty(2, 3, 4, dtype=torch.long, device="cuda")
            out = o.masked_gather(x, idx)
            T.gather_backward_impl(out, idx.int(), 13)
            o.salt_loss(torch.empty(6, 4, 24, device="cuda", dtype=torch.bfloat16), x, idx, "l1")

    monkeypatch.delenv(kernels.CHECK_ENV, raising=False)
    run()
    assert all(stub.launches == 1 for stub in stubs.values())
    monkeypatch.setenv(kernels.CHECK_ENV, "1")
    # int(t) of a fake CUDA tensor stops before dispatch on a CPU build of torch, with its own error
    caught = "host sync|not linked with support for cuda"
    with pytest.raises((AssertionError, RuntimeError), match=caught):
        run()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_ops_do_not_sync(ops):
    """On a GPU, every backend's ops under torch.cuda.set_sync_debug_mode('error'), which raises
    on any synchronising call torch makes (.item(), a device->host copy): C++/CUDA and triton."""
    o, device = ops
    if device != "cuda": pytest.skip("a CPU backend")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 13, 24, generator=g).to(device).requires_grad_()
    pred = torch.randn(6, 4, 24, generator=g).to(device).requires_grad_()
    idx = make_idx(2, 3, 13, 4, g, device)

    def step():
        (o.masked_gather(x, idx) * 2).sum().backward()
        o.salt_loss(pred, x.detach(), idx).backward()

    step()  # first calls outside the check: building, compiling and loading kernels may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def namespace(o):
    """The registered ops of a backend (the triton ones are registered when kernels.get imports them)."""
    return torch.ops.us_jepa_triton if o.name == "triton" else torch.ops.us_jepa_ext


def test_bad_shapes_and_dtypes_raise(ops):
    o, device = ops
    x = torch.randn(2, 10, 8, device=device)
    idx = torch.zeros(1, 2, 3, dtype=torch.long, device=device)
    with pytest.raises((RuntimeError, ValueError)): o.masked_gather(x[0], idx)  # x not 3-D
    with pytest.raises((RuntimeError, ValueError)): o.masked_gather(x, idx[:, :1])  # B mismatch
    with pytest.raises((RuntimeError, ValueError)): o.masked_gather(x, idx.float())  # float indices
    with pytest.raises((RuntimeError, TypeError)): o.masked_gather(x.int(), idx)  # integer data
    with pytest.raises((RuntimeError, ValueError)): o.salt_loss(torch.randn(2, 3, 7, device=device), x, idx)
    with pytest.raises(ValueError, match="must not require grad"):
        o.salt_loss(torch.randn(2, 3, 8, device=device), x.requires_grad_(), idx)
    with pytest.raises(ValueError, match="kind"): o.salt_loss(torch.randn(2, 3, 8, device=device), x.detach(), idx, "huber")


def test_mixed_dtypes_like_autocast(ops):
    """bf16 predictions (autocast) against float32 teacher features compute in float32, as the reference."""
    o, device = ops
    g = torch.Generator().manual_seed(6)
    feats, idx = torch.randn(3, 13, 24, generator=g).to(device), make_idx(2, 3, 13, 4, g, device)
    pred = torch.randn(6, 4, 24, generator=g).to(device, torch.bfloat16)
    pr, pk = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ref, out = U.salt_loss(pr, feats, idx), o.salt_loss(pk, feats, idx)
    ref.backward(); out.backward()
    torch.testing.assert_close(out, ref)
    assert pk.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pk.grad, pr.grad)  # bf16 tolerances


def test_int32_indices(ops):
    o, device = ops
    x = torch.randn(2, 10, 8, device=device)
    idx = torch.randint(0, 10, (3, 2, 4), device=device)
    assert torch.equal(o.masked_gather(x, idx.int()), U.apply_masks(x, idx))


def test_opcheck(ops):
    o, device = ops
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 13, 24, generator=g).to(device).requires_grad_()
    idx = make_idx(2, 3, 13, 4, g, device)
    pred = torch.randn(6, 4, 24, generator=g).to(device).requires_grad_()
    ns = namespace(o)
    torch.library.opcheck(ns.masked_gather.default, (x, idx))
    torch.library.opcheck(ns.masked_gather_backward.default, (pred.detach().requires_grad_(), idx, 13))
    torch.library.opcheck(ns.salt_loss.default, (pred, x.detach(), idx, 0.5, 0))


def test_gradcheck_float64_cpp():
    """gradcheck in float64: first and second derivatives of the gather, first of the loss."""
    o = kernels.get("cpp", "cpu")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = make_idx(3, 2, 7, 3, g, "cpu")
    assert torch.autograd.gradcheck(lambda x: o.masked_gather(x, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda x: o.masked_gather(x, idx), (x,))
    feats = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    pred = torch.randn(6, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for kind, beta in [("smooth_l1", 0.5), ("l1", 1.0), ("l2", 1.0)]:
        assert torch.autograd.gradcheck(lambda p: o.salt_loss(p, feats, idx, kind, beta), (pred,))


def test_explicit_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="cannot run here"):
        kernels.get("cuda", "cpu")
    with pytest.raises(RuntimeError, match="unknown backend"):
        kernels.get("fast", "cpu")
    ops, line = kernels.auto("cpu")
    assert ops.name == "cpp" and line == "kernels: cpp"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_pretrain_step_same_loss_with_each_backend(backend):
    """One SALT step through us_jepa's own wiring: the loss and the gradients match the references'."""
    if kernels.why_not(backend, "cpu"): pytest.skip(kernels.why_not(backend, "cpu"))
    def step(name):
        torch.manual_seed(0)
        gather, loss_fn = U.select_kernels(name, "cpu", U.REFERENCES)
        enc, teacher = U.ViT(48, 16, "vit_tiny", depth=1, gather=gather), U.ViT(48, 16, "vit_tiny", depth=1).eval()
        head = U.Predictor(3, 192, 32, 1, 2, 192, gather)
        img = torch.rand(4, 1, 48, 48)
        ctx, tgt = torch.tensor([[0, 1, 2, 4]] * 4), torch.tensor([[[5, 6]] * 4, [[6, 8]] * 4])
        with torch.no_grad(): feats = teacher(img)
        loss = loss_fn(head(enc(img, ctx), ctx, tgt), feats, tgt, "smooth_l1", 1.0)
        loss.backward()
        return loss.detach(), enc.patch_embed.proj.weight.grad.clone()

    ref, got = step("torch"), step(backend)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)


def test_compiled_pretrain_step_with_fused_ops():
    """torch.compile(fullgraph=True, inductor) traces a SALT step's forward through the registered ops (their
    fake and autograd registrations: no graph break) and gives the eager loss and gradients."""
    def tiny(gather):
        torch.manual_seed(0)
        enc, teacher = U.ViT(48, 16, "vit_tiny", depth=1, gather=gather), U.ViT(48, 16, "vit_tiny", depth=1).eval()
        return enc, teacher, U.Predictor(3, 192, 32, 1, 2, 192, gather)

    def make_step(enc, teacher, head, loss_fn):
        def step(img, ctx, tgt):
            with torch.no_grad(): feats = teacher(img)
            return loss_fn(head(enc(img, ctx), ctx, tgt), feats, tgt, "smooth_l1", 1.0)
        return step

    img = torch.rand(4, 1, 48, 48)
    ctx, tgt = torch.tensor([[0, 1, 2, 4]] * 4), torch.tensor([[[5, 6]] * 4, [[6, 8]] * 4])
    gather, loss_fn = U.select_kernels("cpp", "cpu", U.REFERENCES)
    a, b = tiny(gather), tiny(gather)
    eager = make_step(*a, loss_fn)(img, ctx, tgt)
    compiled = torch.compile(make_step(*b, loss_fn), fullgraph=True)(img, ctx, tgt)
    eager.backward(); compiled.backward()  # the compiled backward graph (AOTAutograd) holds the op's backward
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(a[0].parameters(), b[0].parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5)


def test_auto_falls_back_and_explicit_backend_fails_when_the_extension_does_not_build(monkeypatch, capsys):
    from kernels import ext
    monkeypatch.setattr(ext, "_state", {"ok": False, "error": "the C++ extension did not build (no compiler)"})
    ops, line = kernels.auto("cpu")
    assert ops is None and line.startswith("kernels: torch reference") and "no compiler" in line
    assert U.select_kernels("auto", "cpu", U.REFERENCES) == (U.apply_masks, U.salt_loss)
    assert "torch reference" in capsys.readouterr().out
    with pytest.raises(U.UserError, match="no compiler"):
        U.select_kernels("cpp", "cpu", U.REFERENCES)


TRITON_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_ops as T
I = dict(R="i32", B="i32", K="i32", N="i32", D="i32")
for dt in ("fp32", "bf16", "fp16"):
    _, rows, block_d = T._launch(128 * 4 * 18, 768)  # the paper's shapes, as the host wrapper launches them
    c = dict(ROWS=rows, BLOCK_D=block_d)
    kernels = [(T._gather_kernel, dict(x_ptr="*" + dt, idx_ptr="*i64", out_ptr="*" + dt, **I, sxb="i32",
                                       sxn="i32", sxd="i32"), c),
               (T._scatter_add_kernel, dict(g_ptr="*" + dt, idx_ptr="*i64", acc_ptr="*fp32", **I), c)]
    kernels += [(T._salt_kernel, dict(p_ptr="*" + dt, f_ptr="*" + dt, idx_ptr="*i64", g_ptr="*" + dt,
                                      part_ptr="*fp32", **I, sfb="i32", sfn="i32", sfd="i32", beta="fp32",
                                      inv="fp32"), dict(c, KIND=kind)) for kind in (0, 1, 2)]
    for fn, sig, const in kernels:
        sig.update({k: "constexpr" for k in const})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert len(k.asm["cubin"]) > 0
print("ok")
"""


@pytest.mark.skipif(not hasattr(__import__("triton"), "compile"), reason="no triton")
def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts kernels the GPU compiler rejects (env.md), so compile each kernel ahead of time
    for sm_90 to PTX and a cubin (Triton's bundled ptxas; no GPU needed), for every dtype and loss kind."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    r = subprocess.run([sys.executable, "-c", TRITON_AOT], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
CSRC = os.path.join(os.path.dirname(kernels.__file__), "csrc")


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
def test_cuda_sources_compile(tmp_path):
    """A compile check (nothing CUDA can link or run on a CPU machine): the torch-free kernels for every dtype,
    then the torch binding with light headers, for sm_90 (H100/H200)."""
    from torch.utils.cpp_extension import include_paths
    inst = tmp_path / "inst.cu"
    inst.write_text('#include "kernels.cuh"\nnamespace us_jepa_ext {\n' + "".join(
        f"template __global__ void salt_rows<1, {t}>(const {t}*, const {t}*, const int64_t*, {t}*, {a}*, int64_t, "
        f"int64_t, int64_t, int64_t, int64_t, float, double);\n"
        f"template __global__ void scatter_add_rows<{t}, {a}>(const {t}*, {a}*, const int64_t*, int64_t, int64_t, "
        f"int64_t, int64_t, int64_t);\n"
        for t, a in [("float", "float"), ("double", "double"), ("__half", "float"), ("__nv_bfloat16", "float")]) + "}\n")
    common = [NVCC, "-c", "-arch=sm_90", "-std=c++20", "-I", CSRC]
    subprocess.run(common + ["-o", str(tmp_path / "k.o"), str(inst)], check=True, capture_output=True)
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    r = subprocess.run(common + ["--expt-relaxed-constexpr", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *incs,
                                 "-o", str(tmp_path / "b.o"), os.path.join(CSRC, "us_jepa_ops.cu")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
