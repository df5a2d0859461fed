"""What the GPU compiler makes of the Triton kernels, without a GPU: compile each specialisation the public
ops launch for sm_90 (H100/H200) and sm_80 (A100) with Triton's own compiler and the ptxas, nvdisasm it
ships, and print registers, spilled bytes, shared memory, resident blocks per SM and the count (and
operand types) of tensor-core instructions in the SASS. The attention kernels first, then the reduction of
their first-layer gradient (``fused_first_layer``), Dice's and MBA's (``other_kernels``).

    python benchmarks/gpu_compile_report.py [--quick] [--check] [--arch 90,80] [--jobs N]

Specialisations (what ``attention_forward`` / ``attention_backward`` pass for B=2048): T in {50, 200},
D in {36, 64}, hidden (80, 40) and (200, 80) (the latter outside ``fused_supported``: listed as running the
composite path), inputs fp32 with TF32 off (torch's default: ``DOT_PRECISION="ieee"``) and on, bf16, fp16;
sigmoid, normalize none and softmax; then (``variant_rows``) the other activations with fused kernels and the
position-split kernels with their merge at DIN's shape. ``--quick``: T=200, D=36, (80, 40), softmax only,
sigmoid and Dice, the split kernels in sigmoid; the dM reduction at D=36, H1=80; Dice on [2048, 200] in fp32,
MBA at D=64 (CI). Registers and
spills come from the log of Triton's own ptxas run (its flags, the cubin a launch loads).
``--check`` exits 1 on any spill (every kernel and precision, the fp32-without-TF32 attention backward
included), any block whose shared memory exceeds the SM's, a 16-bit / TF32 attention specialisation without
tensor-core instructions, or 16-bit inputs whose MMAs run in TF32: the gate issue 12 asks CI for
(``tests/test_gpu_compile_report.py`` runs ``--quick --check``; benchmarks/RESULTS.md, section 9). Each
specialisation is compiled with the launcher's own choices: ``_block_sizes`` (per backward pass),
``_backward_stages`` (``num_stages``), the forwards' register caps, ``DT._stage_configs``; those of the
Triton that runs the report (Triton before 3.9 has its own: ``_triton_before_3_9``). Under Triton 3.6, as a
stock CUDA image ships it: ``make compile-report-triton36``. With more than one core the architectures compile in
processes of their own (``--jobs``, one per architecture; the compiles are single-threaded: the quick set took
211 s in one process here, 102 s in two), merged into the table that one process prints.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter (before triton is imported)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Optional, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from din_kernels.testing import attention_fused as A  # noqa: E402
from din_kernels.testing import attention_fused_dice_training as DT  # noqa: E402

# per SM: registers, shared memory a block may use, resident threads, resident blocks
SM_LIMITS = {90: (65536, 227 * 1024, 2048, 32), 80: (65536, 163 * 1024, 2048, 32)}
ARCHS = tuple(SM_LIMITS)  # (90, 80): the report's order
TOOLS = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"
TENSOR_CORE = re.compile(r"\b(?:HMMA|HGMMA|IMMA|WGMMA|QGMMA)((?:\.[A-Za-z0-9]+)*)")
INTS = {"C", "T", "D", "H1", "H2", "stride_kb", "stride_kt", "CHUNK", "SPLITS"}  # the attention kernels' ints
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = {"fp32": ("fp32", "ieee"), "fp32-tf32": ("fp32", "tf32"), "bf16": ("bf16", "tf32"),
              "fp16": ("fp16", "tf32")}


@dataclass
class Row:
    kernel: str
    arch: int
    precision: str
    seq_len: int
    dim: int
    hidden: Sequence[int]
    softmax: bool
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    blocks_per_sm: int = 0
    tensor_core: int = 0
    mma_types: str = ""  # the operand types of those instructions, e.g. "TF32" or "BF16"
    num_warps: int = 0
    note: str = ""
    problem: str = ""  # Dice and MBA rows: the problem they were compiled for (no T, D, hidden)

    def problems(self) -> List[str]:
        if self.note:
            return []
        limits = SM_LIMITS[self.arch]
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} bytes spilled")
        if self.shared > limits[1]:
            found.append(f"shared {self.shared} > {limits[1]}")
        if not self.problem and self.precision != "fp32" and self.tensor_core == 0:
            found.append("no tensor-core instruction")
        if self.precision in ("bf16", "fp16") and "TF32" in self.mma_types:
            found.append("16-bit inputs upcast: TF32 MMAs, not 16-bit ones")
        return found


def _tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        raise RuntimeError(f"{name} not found in Triton's wheel ({path})")
    return str(path)


def compile_one(fn, arch: int, precision: str, seq_len: int, dim: int, hidden: Sequence[int], softmax: bool,
                backward: bool, backward_pass: int = 0, candidates: bool = False, activation: str = "sigmoid",
                split: bool = False) -> Row:
    """``candidates``: the specialisation of several candidates per history (the forward's C a runtime int,
    the backward's later launches accumulating); else one candidate, as training runs. ``activation``: the
    MLP's (``activations.ACTIVATION_SPECS`` with fused kernels), named after the kernel unless sigmoid.
    ``split``: the rows x position-splits form (``SPLIT``, ``attention_fused._position_splits``)."""
    name = fn.__name__.strip("_").replace("din_attention_", "").replace("_kernel", "")
    name += (f" pass {backward_pass}" if backward_pass else "") + (" C>1" if candidates else "")
    name += (" split" if split else "") + (f" {activation}" if activation != "sigmoid" else "")
    row = Row(name, arch, precision, seq_len, dim, tuple(hidden), softmax)
    keys = torch.empty(1, 1, dim, dtype=TORCH_DTYPES[PRECISIONS[precision][0]])
    weights = [torch.empty(h, 1) for h in hidden for _ in (0, 1)] + [torch.empty(1, 1), torch.empty(1)]
    if not A.fused_supported(keys, weights):
        row.note = "outside fused_supported: the composite path runs"
        return row
    dtype, dot_precision = PRECISIONS[precision]
    if fn is A._din_attention_fwd_candidates_kernel and dot_precision == "ieee":
        # (attention_forward runs a program per candidate there: this kernel's FMA products spilled 11-46 KB)
        row.note = "not launched for fp32 without TF32: a program per candidate runs"
        return row
    block_t, block_d, block_h1, block_h2, num_warps = A._block_sizes(seq_len, dim, hidden, backward=backward,
                                                                     dot_precision=dot_precision,
                                                                     backward_pass=backward_pass,
                                                                     activation=activation,
                                                                     accumulate=backward and candidates,
                                                                     split=split, softmax=softmax, arch=arch)
    consts = dict(**A._activation_constexprs(activation), TWO_LAYERS=len(hidden) == 2, SOFTMAX=softmax,
                  DOT_PRECISION=dot_precision, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1,
                  BLOCK_H2=block_h2, INTERPRETED=False)
    if "SPLIT" in fn.arg_names:
        consts["SPLIT"] = split
    if backward:
        consts.update(PASS=backward_pass, ACCUMULATE=candidates)  # (the first, or only, candidate: False)
    elif "BLOCK_C" in fn.arg_names:  # the candidate-block forward ("concat", several candidates)
        consts["BLOCK_C"] = A._candidate_block(4, activation)
    elif not candidates:
        # one candidate per history, as training launches it: Triton's JIT specializes an int argument equal
        # to 1 as a constexpr
        consts["C"] = 1
    signature = {name: ("constexpr" if name in consts else "fp32" if name == "scale" else
                        "i32" if name in INTS else "*i64" if name == "LENGTHS" else
                        f"*{dtype}" if name in ("K", "DK", "OUT", "DOUT") else "*fp32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    # (the launcher's own options: the backward's ``num_stages``, the forwards' register caps)
    options = (A._backward_stages(backward_pass) if backward else
               A._forward_options(num_warps, dot_precision, arch) if fn is A._din_attention_fwd_kernel else
               A._candidates_forward_options(activation))
    return _assemble(row, source, arch, num_warps, options)


@contextlib.contextmanager
def _triton_ptxas_log():
    """Collect the log of the ptxas run inside ``triton.compile`` (``knobs.nvidia.dump_ptxas_log``, which
    prints it; ``always_compile`` so that a cached kernel is assembled again). Empty where this Triton has no
    such knobs."""
    knobs = getattr(triton, "knobs", None)
    nvidia, compilation = getattr(knobs, "nvidia", None), getattr(knobs, "compilation", None)
    if not (hasattr(nvidia, "dump_ptxas_log") and hasattr(compilation, "always_compile")):
        yield io.StringIO()
        return
    before = nvidia.dump_ptxas_log, compilation.always_compile
    log = io.StringIO()
    nvidia.dump_ptxas_log, compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        nvidia.dump_ptxas_log, compilation.always_compile = before


def _assemble(row: Row, source, arch: int, num_warps: int, options: Optional[Dict[str, int]] = None) -> Row:
    """Compile ``source`` for ``arch`` (``options``: launch options beyond ``num_warps``, as the launcher
    passes them), assemble it again with ``ptxas -v`` and disassemble the cubin: fill ``row``'s registers,
    spills, shared memory, blocks per SM and tensor-core instructions."""
    with _triton_ptxas_log() as log:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options=dict(options or {}, num_warps=num_warps))
    row.num_warps, row.shared = num_warps, kernel.metadata.shared
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = Path(folder) / "k.ptx", Path(folder) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        # Triton's own ptxas run (its flags: on 3.9 ``-lineinfo --regAllocOptLevel=2``), whose cubin is the one a
        # launch loads; reassembling with bare ``ptxas -v`` allocated registers differently (12 against 28
        # spilled bytes in one specialisation, 0 against 20 in another); only where that log is unavailable
        info = log.getvalue() if "Used" in log.getvalue() else ""
        for assembler in ("ptxas", "ptxas-blackwell"):  # the wheel's two: the older may refuse newer PTX
            if info or not (TOOLS / assembler).exists():
                continue
            run = subprocess.run([str(TOOLS / assembler), "-v", f"-arch={sm}", str(ptx), "-o",
                                  str(Path(folder) / "o")], capture_output=True, text=True)
            if run.returncode == 0:
                info = run.stderr
                break
        if not info:
            raise RuntimeError(f"no ptxas in {TOOLS} assembled {row.kernel} for {sm}")
        sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    registers = re.search(r"Used (\d+) registers", info)
    row.registers = int(registers.group(1)) if registers else 0
    row.spill_bytes = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    suffixes = TENSOR_CORE.findall(sass)
    row.tensor_core = len(suffixes)
    operand = re.compile(r"\.(TF32|BF16|F16|E4M3|E5M2|S8|U8)\b")
    # (an HMMA without an operand suffix, e.g. HMMA.16816.F32, multiplies fp16: F16 is its default)
    row.mma_types = ",".join(sorted({(operand.findall(suffix) or ["F16"])[0] for suffix in suffixes}))
    regs, smem, threads, blocks = SM_LIMITS[arch]
    per_block_threads = 32 * num_warps
    by_regs = regs // max(row.registers * per_block_threads, 1)
    by_smem = smem // row.shared if row.shared else blocks
    row.blocks_per_sm = min(by_regs, by_smem, threads // per_block_threads, blocks)
    return row


def report(quick: bool, archs: Sequence[int] = ARCHS) -> List[Row]:
    """Every specialisation for ``archs``, each row printed as it is compiled: the attention kernels
    (``attention_rows``) under ``HEADER`` (printed by the caller), one architecture after the other, then
    ``OTHER_HEADER`` and the other kernels, likewise (the order ``report_in_processes`` merges into)."""
    rows = []
    for arch in archs:
        for row in attention_rows(quick, arch):
            rows.append(row)
            print(_line(row), flush=True)
    print("\n" + OTHER_HEADER)
    for arch in archs:
        for row in other_kernels(arch, quick):
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def attention_rows(quick: bool, arch: int) -> Iterator[Row]:
    """The attention kernels for ``arch``: sigmoid at every shape, precision and normalisation, then the
    Dice-training stages, then the activation variants and the position splits (``variant_rows``)."""
    shapes = [(200, 36, (80, 40))] if quick else list(itertools.product((50, 200), (36, 64), ((80, 40), (200, 80))))
    softmaxes = (True,) if quick else (False, True)
    kernels = ((A._din_attention_fwd_kernel, False), (A._din_attention_bwd_kernel, True),
               (A._din_attention_fwd_candidates_kernel, False))
    for (seq_len, dim, hidden), softmax, precision in itertools.product(shapes, softmaxes, PRECISIONS):
        for fn, backward in kernels:
            several = not quick and (seq_len, dim, hidden) == (200, 36, (80, 40)) and softmax
            if fn is A._din_attention_fwd_candidates_kernel and not several:
                continue  # (listed for DIN's shape only, in the full report)
            for candidates in (False, True) if several and fn is not A._din_attention_fwd_candidates_kernel \
                    else (fn is A._din_attention_fwd_candidates_kernel,):
                for backward_pass in _passes(precision, hidden, backward, "sigmoid", candidates, arch):
                    yield compile_one(fn, arch, precision, seq_len, dim, hidden, softmax, backward, backward_pass,
                                      candidates)
    # Dice attention in training mode (fused_dice_training.py): every stage the launchers run, one candidate
    for (seq_len, dim, hidden), softmax, precision in itertools.product(shapes, softmaxes,
                                                                         ("fp32", "fp32-tf32", "bf16")):
        yield from dice_training_kernels(arch, precision, seq_len, dim, hidden, softmax)
    yield from variant_rows(quick, arch)


def dice_training_kernels(arch: int, precision: str, seq_len: int, dim: int, hidden: Sequence[int],
                          softmax: bool) -> List[Row]:
    """The Dice-training kernels' stages (``train-fwd stage l``: layer l's moments, the last one the scores;
    ``train-bwd stage s``: 0 the top layer's sums, 1 layer 2's dz and layer 1's sums, in two parts for fp32
    without TF32, 2 the first layer, in two parts where ``DT._first_layer_parts`` says so) as
    ``attention_triton_dice_training_forward`` / ``_backward`` launch them on ``arch`` (block sizes and launch
    options from ``DT._stage_configs``)."""
    dtype, dot_precision = PRECISIONS[precision]
    keys = torch.empty(1, 1, dim, dtype=TORCH_DTYPES[dtype])
    weights = [torch.empty(h, 1) for h in hidden for _ in (0, 1)] + [torch.empty(1, 1), torch.empty(1)]
    if not DT.dice_training_supported(keys, weights):
        row = Row("train-fwd/bwd", arch, precision, seq_len, dim, tuple(hidden), softmax)
        row.note = "outside dice_training_supported: the composite path runs"
        return [row]
    with _tf32(precision):
        (forward, forward_options), backward = DT._stage_configs(keys.dtype, seq_len, dim, hidden, arch)
    layers = len(hidden)
    launches = [(DT._dice_train_fwd_kernel, f"train-fwd stage {stage}", stage, 0, forward, forward_options)
                for stage in range(layers + 1)]
    launches += [(DT._dice_train_bwd_kernel, f"train-bwd stage {stage}" + (f" part {part}" if part else ""), stage,
                  part, blocks, options) for stage, part, blocks, options in backward]
    rows = []
    for fn, name, stage, part, blocks, options in launches:
        block_t, block_d, block_h1, block_h2, num_warps = blocks
        consts = dict(STAGE=stage, TWO_LAYERS=layers == 2, SOFTMAX=softmax, DOT_PRECISION=dot_precision,
                      BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2, INTERPRETED=False)
        if fn is DT._dice_train_bwd_kernel:
            consts["PART"] = part
        types = {name: "i32" for name in ("T", "D", "H1", "H2", "stride_kb", "stride_kt")}
        types.update(scale="fp32", LENGTHS="*i64", **{n: f"*{dtype}" for n in ("K", "DK", "OUT", "DOUT")})
        row = Row(name, arch, precision, seq_len, dim, tuple(hidden), softmax)
        rows.append(_assemble(row, _signature(fn, consts, types, "*fp32"), arch, num_warps, options))
    return rows


# The MLP activations with fused kernels besides sigmoid (``activations.ACTIVATION_SPECS``; dice: its eval form,
# running statistics): the public ops launch each. ``--quick``: dice only (alpha and statistics: the most live
# values).
VARIANT_ACTIVATIONS = ("relu", "prelu", "dice", "identity")


def variant_rows(quick: bool, arch: int) -> Iterator[Row]:
    """The activation variants and the position-split kernels at DIN's shape (T=200, D=36, hidden (80, 40)):
    every activation with fused kernels, softmax and none (``--quick``: dice, softmax), one candidate and
    several as ``report`` lists sigmoid; the split forward and backward (``SPLIT``, launched when the rows
    are too few to fill the GPU: ``attention_fused._position_splits``) for every activation (``--quick``:
    sigmoid) and their merge kernel (D 36 and 64). Yields each row as it is compiled."""
    seq_len, dim, hidden = 200, 36, (80, 40)
    kernels = ((A._din_attention_fwd_kernel, False), (A._din_attention_bwd_kernel, True),
               (A._din_attention_fwd_candidates_kernel, False))
    activations = ("dice",) if quick else VARIANT_ACTIVATIONS
    softmaxes = (True,) if quick else (True, False)
    for activation, softmax, precision in itertools.product(activations, softmaxes, PRECISIONS):
        for fn, backward in kernels:
            several = not quick and softmax
            if fn is A._din_attention_fwd_candidates_kernel and not several:
                continue
            for candidates in (False, True) if several and fn is not A._din_attention_fwd_candidates_kernel \
                    else (fn is A._din_attention_fwd_candidates_kernel,):
                for backward_pass in _passes(precision, hidden, backward, activation, candidates, arch):
                    yield compile_one(fn, arch, precision, seq_len, dim, hidden, softmax, backward, backward_pass,
                                      candidates, activation=activation)
    activations = ("sigmoid",) if quick else ("sigmoid",) + VARIANT_ACTIVATIONS
    for activation, softmax, precision in itertools.product(activations, softmaxes, PRECISIONS):
        for fn, backward in kernels[:2]:
            for backward_pass in _passes(precision, hidden, backward, activation, False, arch, split=True):
                yield compile_one(fn, arch, precision, seq_len, dim, hidden, softmax, backward, backward_pass,
                                  activation=activation, split=True)
    for softmax, merge_dim in itertools.product(softmaxes, (36,) if quick else (36, 64)):
        yield compile_merge(arch, seq_len, merge_dim, softmax)


def _passes(precision: str, hidden: Sequence[int], backward: bool, activation: str, candidates: bool,
            arch: int, split: bool = False) -> Sequence[int]:
    """The backward ``PASS`` values ``attention_backward`` launches for this specialisation (``candidates``:
    a later candidate's launch, ACCUMULATE; ``split``: SPLIT); (0,) for a forward kernel."""
    if not backward:
        return (0,)
    with _tf32(precision):
        return A._backward_passes(TORCH_DTYPES[PRECISIONS[precision][0]], hidden, activation=activation,
                                  accumulate=candidates, split=split, arch=arch)


def compile_merge(arch: int, seq_len: int, dim: int, softmax: bool) -> Row:
    """``_din_attention_fwd_merge_kernel`` as ``attention_forward`` launches it after a split forward (B=256
    at T=200 on 132 SMs: three splits, ``BLOCK_S`` 4), fp32 partials, fp32 output."""
    block_t = A._block_sizes(seq_len, dim, (80, 40), dot_precision="tf32")[0]
    consts = dict(SOFTMAX=softmax, BLOCK_T=block_t, BLOCK_D=A._block(dim), BLOCK_S=4)
    types = dict(LENGTHS="*i64", C="i32", T="i32", D="i32", CHUNK="i32", SPLITS="i32")
    row = Row("fwd_merge", arch, "fp32", seq_len, dim, (), softmax)
    return _assemble(row, _signature(A._din_attention_fwd_merge_kernel, consts, types, "*fp32"), arch,
                     A._MERGE_NUM_WARPS)


def _signature(fn, consts: Dict[str, object], types: Dict[str, str], default: str) -> ASTSource:
    signature = {name: "constexpr" if name in consts else types.get(name, default) for name in fn.arg_names}
    return ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})


def other_kernels(arch: int, quick: bool) -> List[Row]:
    """The reduction of the attention backward's dM (``first_layer_m_grads``: B=2048, D 36 and 64, H1 80 and
    200), the Dice kernels on a DIN head's activations ([2048, 200] and [2048, 80], training: statistics with
    and without a padding mask, merge, forward, both backward kernels) and the MBA kernels (lookup and update
    in each mode, D=18 and 64), at the launch configurations their launchers pick on a 132-SM GPU."""
    # (by module path: the package's ``dice`` and ``mba`` names are its functions)
    from din_kernels.testing import attention_fused_first_layer as FL, dice_module as Dice, mba_module as MBA

    rows = []
    for dim, hidden in ((36, 80),) if quick else itertools.product((36, 64), (80, 200)):
        row = Row("first_layer_m_grads", arch, "fp32", 0, 0, (), False, problem=f"B=2048, D={dim}, H1={hidden}")
        consts = dict(BLOCK_B=FL.BLOCK_B, BLOCK_H=max(16, triton.next_power_of_2(hidden)))
        source = _signature(FL._first_layer_m_grads_kernel, consts, dict(B="i32", D="i32", H1="i32", ROWS="i32"),
                            "*fp32")
        rows.append(_assemble(row, source, arch, FL.NUM_WARPS))
    dice_sizes = [(2048, 200)] if quick else [(2048, 200), (2048, 80)]
    dtypes = ("fp32",) if quick else ("fp32", "bf16")
    original_sm_count = Dice._sm_count
    Dice._sm_count = lambda index: 132  # an H100 / H200 (the launcher asks the device)
    try:
        for (n, c), dtype in itertools.product(dice_sizes, dtypes):
            block_n, block_c, _, chunks, num_warps = Dice._launch_config(n, c, torch.device("cuda", 0))
            data = {name: f"*{dtype}" for name in ("X", "Y", "DX", "DY")}
            types = dict(data, MASK="*u8", COUNT_P="*i32", COUNT="*i32", N="i32", C="i32", rows_per_prog="i32",
                         P="i32", eps="fp32", momentum="fp32")
            blocks = dict(BLOCK_N=block_n, BLOCK_C=block_c)
            flags = dict(ALPHA_PER_CHANNEL=True, AFFINE=False)
            launches = [(Dice._dice_stats_kernel, dict(blocks, HAS_MASK=True), "stats, masked"),
                        (Dice._dice_stats_kernel, dict(blocks, HAS_MASK=False), "stats"),
                        (Dice._dice_merge_kernel, dict(HAS_RUNNING=True, BLOCK_P=min(triton.next_power_of_2(chunks),
                                                                                  32), BLOCK_C=block_c), "merge"),
                        (Dice._dice_fwd_kernel, dict(blocks, **flags), "forward"),
                        (Dice._dice_bwd_kernel, dict(blocks, WRITE_DX=False, **flags), "backward sums"),
                        (Dice._dice_bwd_dx_kernel, dict(blocks, HAS_MASK=True, **flags), "backward dx")]
            for fn, consts, what in launches:
                row = Row(fn.__name__.strip("_").replace("_kernel", ""), arch, dtype, 0, 0, (), False,
                          problem=f"[{n}, {c}] {what}")
                rows.append(_assemble(row, _signature(fn, consts, types, "*fp32"), arch, num_warps))
    finally:
        Dice._sm_count = original_sm_count
    types = dict(ids_ptr="*i64", order_ptr="*i64", rows_ptr="*i64", starts_ptr="*i64", ends_ptr="*i64",
                 K="i32", D="i32", stride_wn="i32", stride_wd="i32", stride_gk="i32", stride_f="i32",
                 stride_s="i32", lam="fp32", lr="fp32", eps="fp32")
    for dim in ((64,) if quick else (18, 64)):
        block_d = MBA._block_d(dim)
        block_k = max(1, min(64, MBA._TILE_ELEMENTS // block_d))
        row = Row("mba_embedding_fwd", arch, "fp32", 0, 0, (), False, problem=f"lookup, D={dim}")
        source = _signature(MBA._mba_embedding_fwd_kernel, dict(BLOCK_K=block_k, BLOCK_D=block_d), types, "*fp32")
        rows.append(_assemble(row, source, arch, MBA._num_warps(block_k * block_d)))
        block_p = max(1, min(16, MBA._TILE_ELEMENTS // block_d))
        for mode, name in ((MBA._MODE_VALUES, "sparse gradient"), (MBA._MODE_SGD, "SGD"),
                           (MBA._MODE_ADAGRAD, "row-wise Adagrad")):
            row = Row("mba_update", arch, "fp32", 0, 0, (), False, problem=f"{name}, D={dim}")
            consts = dict(MODE=mode, BLOCK_P=block_p, BLOCK_D=block_d, SINGLE_TILE=dim <= block_d,
                          ACC=triton.language.float32)
            source = _signature(MBA._mba_update_kernel, consts, types, "*fp32")
            rows.append(_assemble(row, source, arch, MBA._num_warps(block_p * block_d)))
    return rows


@contextlib.contextmanager
def _tf32(precision: str):
    """torch's TF32 switch as this precision has it (``_backward_passes`` reads it through ``_dot_precision``)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "fp32-tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


HEADER = ("| kernel | sm | inputs | T | D | hidden | softmax | warps | registers | spilled bytes | shared bytes "
          "| blocks / SM | tensor-core instr. (types) |\n|" + " --- |" * 13)


OTHER_HEADER = ("| kernel | sm | inputs | problem | warps | registers | spilled bytes | shared bytes | blocks / SM "
                "| tensor-core instr. (types) |\n|" + " --- |" * 10)


def _line(row: Row) -> str:
    if row.problem:
        return (f"| {row.kernel} | {row.arch} | {row.precision} | {row.problem} | {row.num_warps} | {row.registers} "
                f"| {row.spill_bytes} | {row.shared} | {row.blocks_per_sm} | {row.tensor_core} {row.mma_types or '-'} |")
    head = (f"| {row.kernel} | {row.arch} | {row.precision} | {row.seq_len} | {row.dim} | "
            f"{','.join(map(str, row.hidden))} | {'yes' if row.softmax else 'no'} |")
    if row.note:
        return head + f" {row.note} |" + " |" * 5
    return head + (f" {row.num_warps} | {row.registers} | {row.spill_bytes} | {row.shared} | {row.blocks_per_sm} | "
                   f"{row.tensor_core} {row.mma_types or '-'} |")


def report_in_processes(quick: bool, archs: Sequence[int], poll_s: float = 15.0) -> List[Row]:
    """``report`` with each architecture in a process of its own (this script with ``--arch A --jobs 1``,
    its rows handed back as JSON), all at once; the rows are printed when all have finished, in ``report``'s
    order, with a line of progress on stderr every ``poll_s`` seconds. RuntimeError with a process's stderr
    if one fails."""
    with tempfile.TemporaryDirectory(prefix="din-compile-report-") as folder:
        children = []
        for arch in archs:
            out, err = (Path(folder) / f"sm_{arch}.{name}" for name in ("out", "err"))
            command = [sys.executable, str(Path(__file__).resolve()), "--arch", str(arch), "--jobs", "1",
                       "--rows-json", str(Path(folder) / f"sm_{arch}.json")] + (["--quick"] if quick else [])
            with open(out, "w") as stdout, open(err, "w") as stderr:
                children.append((arch, out, err, subprocess.Popen(command, stdout=stdout, stderr=stderr)))
        started = time.monotonic()
        try:
            while any(child.poll() is None for *_, child in children):
                time.sleep(min(poll_s, 1.0))
                if time.monotonic() - started >= poll_s:
                    started = time.monotonic()
                    counts = ", ".join(f"sm_{arch} {_rows_printed(out)} rows" for arch, out, _, _ in children)
                    print(f"compiling in {len(children)} processes: {counts}", file=sys.stderr, flush=True)
        finally:
            for *_, child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        for arch, _, err, child in children:
            if child.returncode != 0:
                raise RuntimeError(f"the sm_{arch} report failed (exit {child.returncode}):\n"
                                   f"{err.read_text()[-3000:]}")
        by_arch = {arch: [Row(**dict(fields, hidden=tuple(fields["hidden"])))
                          for fields in json.loads((Path(folder) / f"sm_{arch}.json").read_text())]
                   for arch in archs}
    attention = [row for arch in archs for row in by_arch[arch] if not row.problem]
    other = [row for arch in archs for row in by_arch[arch] if row.problem]
    for row in attention:
        print(_line(row))
    print("\n" + OTHER_HEADER)
    for row in other:
        print(_line(row), flush=True)
    return attention + other


def _rows_printed(path: Path) -> int:
    with open(path) as lines:
        return sum(line.startswith("| ") and not line.startswith(("| kernel ", "| --- ")) for line in lines)


def _archs(text: str) -> List[int]:
    try:
        archs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        archs = []
    if not archs or any(arch not in SM_LIMITS for arch in archs) or len(set(archs)) != len(archs):
        raise argparse.ArgumentTypeError(f"expected distinct SM versions among {','.join(map(str, ARCHS))}, "
                                         f"got {text!r}")
    return archs


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape (CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, shared overflow, no tensor cores")
    parser.add_argument("--arch", type=_archs, default=list(ARCHS), help="comma-separated SM versions (default 90,80)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="processes, one architecture each (default: one per architecture, at most the cores)")
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)  # (a --jobs child: where its rows go)
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error(f"--jobs must be >= 0 (0: one per architecture up to the cores), got {args.jobs}")
    jobs = args.jobs or min(len(args.arch), len(os.sched_getaffinity(0)))
    print(f"triton {triton.__version__}, torch {torch.__version__}; compiled here, not run")
    print(HEADER)
    if jobs > 1 and len(args.arch) > 1:
        rows = report_in_processes(args.quick, args.arch)
    else:
        rows = report(args.quick, args.arch)
    if args.rows_json:
        Path(args.rows_json).write_text(json.dumps([asdict(row) for row in rows]))
    failures = [(row, problem) for row in rows for problem in row.problems()]
    print(f"\n{len(rows)} specialisations, {len(failures)} problems")
    for row, problem in failures:
        where = row.problem or f"T={row.seq_len} D={row.dim} {row.hidden}"
        print(f"  {row.kernel} sm_{row.arch} {row.precision} {where}: {problem}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
