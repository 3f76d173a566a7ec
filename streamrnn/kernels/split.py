"""One stream's long run of events stepped by two threads: its hidden units split between them.

A single stream is strictly sequential, and its step is a matrix-vector product over the
recurrent weights (LSTM64: 64 KB float32), more than one core's 32 KB L1: one core streams
them from L2 every event. Here (a "persistent RNN", as GPU persistent kernels do) thread t
owns a contiguous range of each layer's hidden units for the whole run: it computes the
gate columns of its units only (so it reads about half of the weights, from its own
caches), applies the gates and the c/h update of its units, publishes its part of the new
h and waits for the partner's once per layer and event (both need the whole h). Each
worker first copies its columns of every layer's weights into a panel of its own,
contiguous (``_pack``): read in place, rows G * H floats apart, its columns map to a quarter
of L1's sets only (12-16 lines for 8 ways at H=64); packed, they spread over all of them.
Each worker keeps its own copy of every layer's h, double-buffered (step i writes buffer
i % 2 and reads the other); an LSTM's c travels with its h in the same block, each worker
keeping its own units' c only (worker 1 hands its c over when worker 0 goes on alone).
The exchange is a mailbox (``_post``/``_fetch``): the worker writes its units' h into
cache lines that carry the epoch in their last 8 bytes, the partner polls those lines and
copies the h out, so the poll itself brings the data (an epoch word, then the h lines read
by the product, were three transfers in a row between the cores). Worker 0 also runs the
head and owns the stored prediction and the outputs, so they need no synchronisation.

What it costs: a barrier is two cache-line transfers between the cores (the writer takes
the line back, the reader fetches it): 48-58 ns on this VM's two vCPUs when the machine is
quiet, 0.5-0.6 us (and much worse) while other processes run (/tmp/s8/K/pingpong.py), so
only layers whose step takes a core about 1 us alone gain (``MIN_LAYER_WEIGHTS``).
Measured, quiet, 1000-event runs, before the panels: LSTM64 0.93 us an event (1.17 alone),
GRU64 0.62 (0.81). Panels and the fused GRU pass against that code, interleaved run by run
in one process (/tmp/s9/A/ab1.py, load 0.4-3, tenth percentile of paired runs, wall):
GRU64 D=1 0.56-0.61 -> 0.42-0.44 us, LSTM64 D=1 0.93 -> 0.61-0.62, GRU64 D=8 0.52-0.53 ->
0.44-0.46, LSTM64 D=8 0.72-1.0 -> 0.70. A worker's half layer run alone (no partner)
gained nothing from the panel in one probe and ~300 cycles in another: where the gain
comes from in the paired run is not pinned down.
The mailbox against the shared buffer and epoch barrier (/tmp/s12/K/ab_pairs.py: run by
run in one process, pairs of adjacent runs split by the old code's time, median ratio new
/ old of worker 0's cycles an event; load 1.3-2.7): LSTM64 D=1 0.98 in the quietest
quarter (1438 -> 1409 cycles, 0.59 us), 0.76 in the loaded half; GRU64 D=1 0.93 / 0.89;
GRU64 D=8 0.84 / 0.82; LSTM64 D=8 1.06 quiet (1613 -> 1704: its panel already overflows
L1 and the mailbox lines add to it) but 0.80 loaded. Phase timings (/tmp/s12/K/trace2.py)
put a worker's half-layer at ~1150 cycles an event in the paired run against ~720 alone,
~130-700 of it stalls on the partner's h lines, more the busier the machine.
L1 sets: a panel laid out so that 56 of its rows stay resident in 7/8 of the sets (the
rest and the scratch in the other eighth) ran no faster than the contiguous one in a
one-core C probe (/tmp/s12/K/mb.c: 65 rows 722 vs 752 cycles, 73 rows 922 vs 915;
fitting rows cost ~9.9 cycles each, each row past ~60 about 26): not done.

Numbers: each output column is summed exactly as ``single.matvec`` sums it (bias, input
terms, recurrent terms, each in k order, one FMA per term), whatever vector group or scalar
column computes it, and the gate updates are ``single``'s expressions term for term: the
same bits as ``single.step_stream`` however the units are split.

Safety: the two workers are the two iterations of a ``prange``; Numba may run them one
after the other (one thread, a busy pool). So they first meet with a bounded wait: the
second to arrive joins ("paired"), but if it has not arrived within ``JOIN_CYCLES`` the
first atomically claims the run ("solo") and leaves; a late partner sees that and leaves
too, and the calling thread steps the run with ``single.step_stream``. A wait spins with ``pause``, and after ``SPIN_CYCLES`` yields the CPU
(sched_yield) between polls, so a partner preempted on this core gets to run; worker 0
then goes on alone (the partner leaves at the next barrier). On a busy machine the
parallel region itself may take milliseconds to start or end (its other thread asleep or
preempted), so a run that did not pay pauses splitting in this process for a while
(``_remember``: 1 ms, doubling up to 1 s while runs keep failing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamrnn.config import jit_options
from streamrnn.kernels.activations import relu32, sigmoid32, tanh32
from streamrnn.kernels.cells import GRU, LSTM, RNN_RELU
from streamrnn.kernels.single import (LANES, OUT_AFTER, OUT_BEFORE, _F32P, _ONE, _at, _column, _data,
                                      _item_data, _n_gates, _plain_layers, lstm_units, lstm_units_plain, matvec,
                                      step_stream)

_OPTS = jit_options()
_PAR_OPTS = jit_options(parallel=True)
_INLINE = dict(_OPTS, inline="always")

#: Shortest run (events) that takes the split: a parallel region starts in ~2 us with its
#: threads awake (and the handshake adds little), a split event saves 0.2-0.4 us at H=64:
#: an estimate with margin, not a measured break-even.
MIN_EVENTS = 64
#: Fewest weights per layer (input and recurrent, summed over layers / layers) worth a
#: split: GRU64 (12.5k weights, 0.8 us a step alone) and LSTM64 (16.6k, 1.2 us) gain. A
#: barrier costs 50 ns on a quiet machine but ~0.5 us while other processes run here
#: (/tmp/s8/K/pingpong.py), so smaller layers (LSTM32, GRU48: 4-7k) stay on one thread;
#: whether they would gain when quiet was not measured.
MIN_LAYER_WEIGHTS = 12_000
#: Time-stamp-counter cycles the first worker waits for its partner before going solo
#: (~100 us here: a pool thread asleep on an idle core wakes in tens of us).
JOIN_CYCLES = 250_000
#: Cycles a barrier spins (with pause) before it starts yielding the CPU between polls.
SPIN_CYCLES = 50_000
#: Events before the share of time spent at barriers is judged (the first waits include
#: the partner's start).
JUDGE_STEPS = 32

# The sync words (int64), each on its own 64-byte line: arrival ticket, run mode, the last
# barrier epoch each worker reached (two lines), worker 1's "the pairing is slow" flag, the
# barrier epoch after which worker 0 goes on alone (0: none yet), and worker 1's "my c is in
# your buffer" when it leaves.
_TICKET, _MODE, _EPOCH, _SLOW, _STOP, _HANDOFF = 0, 8, 16, 32, 40, 48
SYNC_WORDS = 56
#: After the sync words, on lines of their own: the mailboxes in which each worker posts its
#: units' new h at the end of a layer-step (``_post``): per worker, two slots (by epoch
#: parity), each a run of 64-byte lines holding MAIL_FLOATS floats and, in the line's last 8
#: bytes, the epoch they belong to.
MAIL_WORD0 = 64
MAIL_FLOATS = 14
#: Run modes: not yet decided, both workers, one worker from the start.
_UNDECIDED, _PAIRED, _SOLO = 0, 1, 2
#: _join's answers besides a worker index (0 or 1).
_EXIT, _ALONE = -1, 2


def enable(on: bool = True) -> None:
    """Turn splitting of long single-stream runs on or off for this process (on unless the
    environment says STREAMRNN_SPLIT=0)."""
    _HEALTH[4] = 1 if on else 0


def split_counts() -> tuple[int, int]:
    """(runs split, runs among them that did not pay) in this process so far."""
    return int(_HEALTH[2]), int(_HEALTH[3])


def _bind_sched_yield():
    """Let compiled code call libc's sched_yield (LLVM resolves the symbol by name)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    llvm_binding.add_symbol("sched_yield", ctypes.cast(libc.sched_yield, ctypes.c_void_p).value)


_bind_sched_yield()

#: The process's memory of how splitting went (int64 words, shared by every kernel call and
#: thread): [0] the time-stamp counter until which runs are not split, [1] the current
#: back-off, [2] runs split, [3] of which did not pay (counts for diagnostics, not exact
#: when threads race), [4] 1 when splitting is on (``enable``), [5] for tests: the event
#: (> 1) after which worker 0 goes on alone as if pairing did not pay (0: none; runs with
#: a bounded handshake only). Compiled code reaches it by symbol name, so cached kernels
#: find it (and a switch needs no recompilation).
_HEALTH_SYMBOL = "streamrnn_split_health"
_HEALTH_WORDS = 8
_HEALTH = (ctypes.c_int64 * _HEALTH_WORDS)()
llvm_binding.add_symbol(_HEALTH_SYMBOL, ctypes.addressof(_HEALTH))
_HEALTH[4] = 0 if os.environ.get("STREAMRNN_SPLIT", "1").strip().lower() in {"0", "false", "no", "off", ""} else 1
#: Back-off after a run that did not pay (partner late or preempted, the parallel region
#: slow to start or end: a busy machine), doubling while it lasts: cycles, about 10 ms and
#: 100 ms. Each failed try can cost milliseconds (the region's end waits for a preempted
#: thread): 1 ms doubling to 1 s cost the bench's LSTM64 D=1 row 15-70% with one core busy;
#: up to 10 s kept the split off for whole bench configs after the PyTorch peers' threads
#: had spun on the second core for a moment.
BACKOFF_MIN = 25_000_000
BACKOFF_MAX = 250_000_000
#: A run that did not pay but lost less than this (cycles, ~0.2 ms here, in the parallel
#: region's start and end and at barriers: a handshake that timed out on a partner that woke
#: up soon after) backs nothing off.
CHEAP_FAILURE = 500_000

_I64 = ir.IntType(64)


def _int_word(context, builder, aryty, ary, idx, ity):
    """Pointer to ary[idx] of a 1-D int64 array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(data, [context.cast(builder, idx, ity, types.intp)])


def _int64_array(ty):
    return isinstance(ty, types.Array) and ty.ndim == 1 and ty.dtype == types.int64


@intrinsic
def _load_acquire(typingctx, arr, i):
    """arr[i], an atomic load with acquire order: what the writer stored before its
    release store is visible after it."""
    if not (_int64_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int_word(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, i), codegen


@intrinsic
def _store_release(typingctx, arr, i, v):
    """arr[i] = v, an atomic store with release order (everything written before it is
    visible to an acquire load that sees v)."""
    if not (_int64_array(arr) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int_word(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(val, ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(arr, i, v), codegen


@intrinsic
def _fetch_add(typingctx, arr, i):
    """Atomically arr[i] += 1 (acquire-release); returns the value before."""
    if not (_int64_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int_word(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        return builder.atomic_rmw("add", ptr, ir.Constant(_I64, 1), "acq_rel")

    return types.int64(arr, i), codegen


@intrinsic
def _swap_if(typingctx, arr, i, expected, new):
    """Atomically: if arr[i] == expected, arr[i] = new. True when it did (acquire-release)."""
    if not (_int64_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int_word(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        exp = context.cast(builder, args[2], signature.args[2], types.int64)
        new_ = context.cast(builder, args[3], signature.args[3], types.int64)
        pair = builder.cmpxchg(ptr, exp, new_, "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return types.boolean(arr, i, expected, new), codegen


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86 pause): the core slows the poll and frees resources."""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _yield_cpu(typingctx):
    """sched_yield(): let another runnable thread on this CPU (a preempted partner) run."""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _prefetch_w(typingctx, ptr):
    """Hint: take the line at ptr into this core's L1 for writing (exclusive)."""
    if ptr != _F32P:
        return None

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(args[0], i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(ptr), codegen


@intrinsic
def _cycles(typingctx):
    """The time-stamp counter (constant rate here), for bounded waits."""

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def _health(typingctx):
    """Pointer to ``_HEALTH`` (an external symbol resolved when the code is linked or loaded)."""

    def codegen(context, builder, signature, args):
        words = ir.ArrayType(_I64, _HEALTH_WORDS)
        var = builder.module.globals.get(_HEALTH_SYMBOL)
        if var is None:
            var = ir.GlobalVariable(builder.module, words, _HEALTH_SYMBOL)
            var.linkage = "external"
        return builder.bitcast(var, _I64.as_pointer())

    return types.CPointer(types.int64)(), codegen


@intrinsic
def _address(typingctx, ptr):
    """A pointer as an integer (``arr.ctypes.data`` would make the kernel uncacheable)."""
    if ptr != _F32P:
        return None

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], _I64)

    return types.int64(ptr), codegen


@njit(**_INLINE)
def _join(sync, join_cycles):
    """The start handshake: this worker's index (0 or 1) when both run together, _ALONE when
    the partner did not come within join_cycles (the run goes to one thread), _EXIT when
    the partner already decided so."""
    if _fetch_add(sync, _TICKET) == 1:
        return 1 if _swap_if(sync, _MODE, _UNDECIDED, _PAIRED) else _EXIT
    start = _cycles()
    while _load_acquire(sync, _MODE) == _UNDECIDED:
        if join_cycles >= 0 and _cycles() - start > join_cycles:
            if _swap_if(sync, _MODE, _UNDECIDED, _SOLO):
                return _ALONE
        else:
            _pause()
    return 0


@njit(**_INLINE)
def _wait(words, i, epoch):
    """Spin until words[i] >= epoch (acquire); after SPIN_CYCLES, yield the CPU between polls.
    Returns the cycles waited (0 when it was there already)."""
    if _load_acquire(words, i) >= epoch:
        return 0
    start = _cycles()
    while _load_acquire(words, i) < epoch:
        if _cycles() - start > SPIN_CYCLES:
            _yield_cpu()
        else:
            _pause()
    return _cycles() - start


@njit(**_INLINE)
def _barrier(sync, me, epoch):
    """Publish that this worker reached ``epoch`` (release: its h writes go with it) and wait
    until the partner has (acquire: the partner's h writes are visible). Returns the cycles
    waited (0 when the partner was there first)."""
    _store_release(sync, _EPOCH + 8 * me, epoch)
    return _wait(sync, _EPOCH + 8 * (1 - me), epoch)


@njit(**_INLINE)
def _mail_line(lines, worker, epoch):
    """First mailbox line (counted from MAIL_WORD0) of ``worker``'s slot for ``epoch``."""
    return (2 * worker + (epoch & 1)) * lines


@njit(**_INLINE)
def _post(sync, syncf, line, h, lo, hi, epoch):
    """Publish h[lo:hi] of ``epoch`` from mailbox line ``line`` on: each line's floats, then its
    epoch (release, so a reader that sees the epoch sees the floats)."""
    j = lo
    while j < hi:
        word = MAIL_WORD0 + 8 * line
        m = _at(_data(syncf), 2 * word)
        if hi - j >= MAIL_FLOATS:
            for f in range(MAIL_FLOATS):  # a fixed count: unrolled, in vectors
                m[f] = h[j + f]
        else:
            for f in range(hi - j):
                m[f] = h[j + f]
        _store_release(sync, word + 7, epoch)
        line += 1
        j += MAIL_FLOATS


@njit(**_INLINE)
def _own(syncf, line, lines):
    """Take mailbox lines [line, line + lines) into this core's cache for writing."""
    for k in range(lines):
        _prefetch_w(_at(_data(syncf), 2 * (MAIL_WORD0 + 8 * (line + k))))


@njit(**_INLINE)
def _fetch(sync, syncf, line, h, lo, hi, epoch):
    """Wait for the partner's h[lo:hi] of ``epoch`` (``_post``) and copy it into this worker's
    h. Returns the cycles waited.

    Together they are the layer-step's barrier: instead of an epoch word the partner polls,
    then the h lines it reads in its product (three cache-line transfers one after the other
    between the cores), the poll fetches the h with its epoch; the copy is read from this
    core's own cache. A slot is rewritten two epochs later, after the reader's next post,
    which it makes only once it has copied this one."""
    waited = 0
    j = lo
    while j < hi:
        word = MAIL_WORD0 + 8 * line
        waited += _wait(sync, word + 7, epoch)
        m = _at(_data(syncf), 2 * word)
        if hi - j >= MAIL_FLOATS:
            for f in range(MAIL_FLOATS):
                h[j + f] = m[f]
        else:
            for f in range(hi - j):
                h[j + f] = m[f]
        line += 1
        j += MAIL_FLOATS
    return waited


@njit(**_INLINE)
def _slow(steps, waited, longest, elapsed):
    """A paired run that costs more than it saves: a barrier had to yield the CPU (the
    partner was not running), or, over at least JUDGE_STEPS events, the barriers took half
    the time (a step alone would take about twice the other half)."""
    return longest > SPIN_CYCLES or (steps >= JUDGE_STEPS and 2 * waited > elapsed)


# ----------------------------------------------------------------------------- products
def _emit_segments(builder, groups, nseg, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride,
                   accn=None, bhn=None):
    """LLVM IR of ``_segspan``: ``single._emit_span`` over ``nseg`` column segments
    ``stride`` elements apart in acc and bias, ``wstride`` apart in the weight rows,
    ``groups`` vectors each: every term acc + v * w on whole vectors, so the same FMAs as
    ``_span``. With accn and bhn, one more segment (weight segment nseg) of recurrent terms
    only, from bias bhn into accn, in the same pass over h (``_gruspan``)."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, LANES)
    i32 = ir.IntType(32)

    def vptr(base, offset):
        return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

    def col(s, g, step=stride):
        return builder.add(builder.mul(ir.Constant(step.type, s), step), ir.Constant(step.type, LANES * g))

    cols = [(s, g) for s in range(nseg) for g in range(groups)]
    regs = [cgutils.alloca_once(builder, vec) for _ in cols]
    for (s, g), reg in zip(cols, regs):
        builder.store(builder.load(vptr(bias, col(s, g)), align=4), reg)
    hcols, hregs = cols, regs
    if accn is not None:
        nregs = [cgutils.alloca_once(builder, vec) for _ in range(groups)]
        for g, reg in enumerate(nregs):
            builder.store(builder.load(vptr(bhn, col(0, g)), align=4), reg)
        hcols, hregs = cols + [(nseg, g) for g in range(groups)], regs + nregs
    for src, n, w, ws, cols_, regs_ in ((x, nx, wx, wxs, cols, regs), (h, nh, wh, whs, hcols, hregs)):
        with cgutils.for_range(builder, n) as loop:
            k = loop.index
            v = builder.load(builder.gep(src, [k]))
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), v, ir.Constant(i32, 0)),
                                          ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
            row = builder.mul(k, ws)
            for (s, g), reg in zip(cols_, regs_):
                wv = builder.load(vptr(w, builder.add(row, col(s, g, wstride))), align=4)
                builder.store(builder.fadd(builder.load(reg), builder.fmul(splat, wv)), reg)
    for (s, g), reg in zip(cols, regs):
        builder.store(builder.load(reg), vptr(acc, col(s, g)), align=4)
    if accn is not None:
        for g, reg in enumerate(nregs):
            builder.store(builder.load(reg), vptr(accn, col(0, g)), align=4)


@intrinsic
def _segspan(typingctx, groups, nseg, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride):
    """For s < nseg and c < LANES * groups (literals), with o = s * stride + c and
    q = s * wstride + c: acc[o] = bias[o] + x[:nx] @ wx[:nx, q] + h[:nh] @ wh[:nh, q]
    (pointers; weights wxs/whs elements per row), in registers: a thread's columns of every
    gate at once."""
    ptrs = (acc, bias, x, wx, h, wh)
    ints = (nx, wxs, nh, whs, stride, wstride)
    if not (isinstance(groups, types.IntegerLiteral) and isinstance(nseg, types.IntegerLiteral)
            and all(p == _F32P for p in ptrs) and all(isinstance(n, types.Integer) for n in ints)):
        return None

    def codegen(context, builder, signature, args):
        _, _, acc_, bias_, x_, nx_, wx_, wxs_, h_, nh_, wh_, whs_, stride_, wstride_ = args
        tys = signature.args

        def intp(value, ty):
            return context.cast(builder, value, ty, types.intp)

        _emit_segments(builder, groups.literal_value, nseg.literal_value, acc_, bias_, x_, intp(nx_, tys[5]), wx_,
                       intp(wxs_, tys[7]), h_, intp(nh_, tys[9]), wh_, intp(whs_, tys[11]), intp(stride_, tys[12]),
                       intp(wstride_, tys[13]))
        return context.get_dummy_value()

    return types.void(groups, nseg, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride), codegen


@intrinsic
def _gruspan(typingctx, groups, acc, bias, accn, bhn, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride):
    """A GRU's (reset_after) r and z columns as ``_segspan`` with nseg 2, and in the same pass
    over h its n gate's recurrent columns: accn[c] = bhn[c] + h[:nh] @ wh[:nh, 2 * wstride + c].
    One pass with 3 * groups accumulators instead of two: the n product alone had only
    ``groups`` (4) dependent FMA chains, bound by the FMA latency."""
    ptrs = (acc, bias, accn, bhn, x, wx, h, wh)
    ints = (nx, wxs, nh, whs, stride, wstride)
    if not (isinstance(groups, types.IntegerLiteral) and all(p == _F32P for p in ptrs)
            and all(isinstance(n, types.Integer) for n in ints)):
        return None

    def codegen(context, builder, signature, args):
        _, acc_, bias_, accn_, bhn_, x_, nx_, wx_, wxs_, h_, nh_, wh_, whs_, stride_, wstride_ = args
        tys = signature.args

        def intp(value, ty):
            return context.cast(builder, value, ty, types.intp)

        _emit_segments(builder, groups.literal_value, 2, acc_, bias_, x_, intp(nx_, tys[6]), wx_, intp(wxs_, tys[8]),
                       h_, intp(nh_, tys[10]), wh_, intp(whs_, tys[12]), intp(stride_, tys[13]),
                       intp(wstride_, tys[14]), accn_, bhn_)
        return context.get_dummy_value()

    return types.void(groups, acc, bias, accn, bhn, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride), codegen


# ``single.matvec`` over columns [0, ncols) of nseg (4, 2 or 1) segments ``stride`` apart in
# acc and bias and ``wstride`` apart in the weight rows (a worker's packed panel, or the
# model's weights), up to 8 vector accumulators at a time, the last columns one by one. Compiled functions, not
# inlined ones, one per segment count: inlined into every caller (with every branch for
# every count) they took most of a minute of cold compilation.

@njit(**_INLINE)
def _columns(nseg, j, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols):
    while j < ncols:
        for s in range(nseg):
            o = s * stride + j
            q = s * wstride + j
            _column(_at(acc, o), _at(bias, o), x, nx, _at(wx, q), wxs, h, nh, _at(wh, q), whs)
        j += 1


@njit(**_OPTS)
def matvec4(acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols):
    j = 0
    while j + 16 <= ncols:
        _segspan(2, 4, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs, stride, wstride)
        j += 16
    if ncols - j >= 8:
        _segspan(1, 4, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs, stride, wstride)
        j += 8
    _columns(4, j, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols)


@njit(**_OPTS)
def matvec2(acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols):
    j = 0
    while j + 32 <= ncols:
        _segspan(4, 2, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs, stride, wstride)
        j += 32
    if ncols - j >= 16:
        _segspan(2, 2, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs, stride, wstride)
        j += 16
    if ncols - j >= 8:
        _segspan(1, 2, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs, stride, wstride)
        j += 8
    _columns(2, j, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols)


@njit(**_OPTS)
def matvec_gru(acc, bias, accn, bhn, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols):
    """``matvec2`` of a GRU's r and z columns and, in the same passes, its n gate's recurrent
    product into accn (``_gruspan``): each column summed as before."""
    j = 0
    while j + 32 <= ncols:
        _gruspan(4, _at(acc, j), _at(bias, j), _at(accn, j), _at(bhn, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j),
                 whs, stride, wstride)
        j += 32
    if ncols - j >= 16:
        _gruspan(2, _at(acc, j), _at(bias, j), _at(accn, j), _at(bhn, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j),
                 whs, stride, wstride)
        j += 16
    if ncols - j >= 8:
        _gruspan(1, _at(acc, j), _at(bias, j), _at(accn, j), _at(bhn, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j),
                 whs, stride, wstride)
        j += 8
    _columns(2, j, acc, bias, x, nx, wx, wxs, h, nh, wh, whs, stride, wstride, ncols)
    n_w = _at(wh, 2 * wstride)
    while j < ncols:
        _column(_at(accn, j), _at(bhn, j), x, 0, n_w, whs, h, nh, _at(n_w, j), whs)
        j += 1


@njit(**_OPTS)
def matvec1(acc, bias, x, nx, wx, wxs, h, nh, wh, whs, ncols):
    """One segment: ``single.matvec`` itself."""
    matvec(acc, bias, x, nx, wx, wxs, h, nh, wh, whs, ncols)


# --------------------------------------------------------------------------------- gates
# ``single``'s gate updates over units [lo, hi): acc[g * H + j] holds gate g of unit j, hprev
# and hnew the layer's whole h before and after, c the owner's c (in place).

# An LSTM layer's block in the h buffers is the state row's: h, then c at +hsz, so its units go
# through single.lstm_units on two pointers (hrow, acc): with h and c apart, LLVM's runtime
# overlap checks exceeded its limit and the loops ran scalar (2.7x the time).

@njit(**_INLINE)
def _gru_after_units(lo, hi, hsz, acc, accn, hprev, hnew):
    for j in range(lo, hi):
        acc[j] = sigmoid32(acc[j])
    for j in range(hsz + lo, hsz + hi):
        acc[j] = sigmoid32(acc[j])
    for j in range(lo, hi):
        ng = tanh32(acc[2 * hsz + j] + acc[j] * accn[j])
        zg = acc[hsz + j]
        h = hprev[j]
        hnew[j] = (_ONE - zg) * ng + zg * h


@njit(**_INLINE)
def _gru_before_units(lo, hi, hsz, acc, accn, hprev, hnew):
    for j in range(lo, hi):
        zg = sigmoid32(acc[hsz + j])
        ng = tanh32(acc[2 * hsz + j] + accn[j])
        h = hprev[j]
        hnew[j] = (_ONE - zg) * ng + zg * h


@njit(**_INLINE)
def _rnn_units(lo, hi, cell, acc, hnew):
    for j in range(lo, hi):
        if cell == RNN_RELU:
            hnew[j] = relu32(acc[j])
        else:
            hnew[j] = tanh32(acc[j])


@njit(**_OPTS)
def _gru_layer(sync, me, paired, epoch, reset_after, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, wseg, b, bhn,
               acc, accn, rh):
    """A GRU layer's units [lo, hi) (weights px/ph: see ``_layer_units``); reset_before meets
    the partner once inside (its n gate's recurrent product needs the whole r * h). Returns
    (epoch, cycles waited)."""
    n = hi - lo
    waited = 0
    col = 2 * hsz + lo
    pxn = _at(px, 2 * wseg)
    phn = _at(ph, 2 * wseg)
    matvec1(_at(acc, col), _at(b, col), x, nx, pxn, wrow, hprev, 0, phn, wrow, n)
    if reset_after:
        matvec_gru(_at(acc, lo), _at(b, lo), _at(accn, lo), _at(bhn, lo), x, nx, px, wrow, hprev, hsz, ph, wrow, hsz,
                   wseg, n)
        _gru_after_units(lo, hi, hsz, acc, accn, hprev, hnew)
        return epoch, waited
    matvec2(_at(acc, lo), _at(b, lo), x, nx, px, wrow, hprev, hsz, ph, wrow, hsz, wseg, n)
    for k in range(lo, hi):
        rh[k] = sigmoid32(acc[k]) * hprev[k]
    if paired:
        epoch += 1
        waited = _barrier(sync, me, epoch)
    # Cho et al.: the n gate's recurrent product sees r * h, whole only after the barrier.
    matvec1(_at(accn, lo), _at(bhn, lo), x, 0, pxn, wrow, rh, hsz, phn, wrow, n)
    _gru_before_units(lo, hi, hsz, acc, accn, hprev, hnew)
    return epoch, waited


@njit(**_OPTS)
def _lstm_layer(plain, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, wseg, b, peep, acc):
    matvec4(_at(acc, lo), _at(b, lo), x, nx, px, wrow, hprev, hsz, ph, wrow, hsz, wseg, hi - lo)
    # c carries over from the previous event's block (this worker's units only).
    for j in range(hsz + lo, hsz + hi):
        hnew[j] = hprev[j]
    if plain:
        lstm_units_plain(lo, hi, hsz, acc, hnew)
    else:
        lstm_units(lo, hi, hsz, acc, hnew, peep)


@njit(**_OPTS)
def _rnn_layer(cell, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, b, acc):
    matvec1(_at(acc, lo), _at(b, lo), x, nx, px, wrow, hprev, hsz, ph, wrow, hi - lo)
    _rnn_units(lo, hi, cell, acc, hnew)


@njit(**_INLINE)
def _layer_units(sync, me, paired, epoch, cell, reset_after, plain, lo, hi, x, nx, hprev, hnew, hsz,
                 px, ph, wrow, wseg, b, bhn, peep, acc, accn, rh):
    """Advance units [lo, hi) of one layer (``single.layer_row``'s products and gates for
    those units), up to the barrier that publishes them (the caller's). Returns (epoch,
    cycles waited) after any barrier inside (GRU reset_before).

    px and ph point at the input and recurrent weights of gate 0's column lo, rows ``wrow``
    elements apart, gate g's columns ``g * wseg`` after gate 0's: the worker's packed panel
    (``_pack``) or the model's own weights."""
    if cell == GRU:
        return _gru_layer(sync, me, paired, epoch, reset_after, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, wseg,
                          b, bhn, acc, accn, rh)
    if cell == LSTM:
        _lstm_layer(plain, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, wseg, b, peep, acc)
    else:
        _rnn_layer(cell, lo, hi, x, nx, hprev, hnew, hsz, px, ph, wrow, b, acc)
    return epoch, 0


@njit(**_INLINE)
def _pack(dst, src, rows, n_gates, hsz, lo, n):
    """dst[k, g * n + c] = src[k, g * hsz + lo + c] for k < rows, g < n_gates, c < n: the
    worker's columns of a layer's weights, contiguous, so its whole share sits in its own L1
    (read in place, rows G * H apart, they fell in a quarter of the cache's sets per worker
    and missed every event)."""
    for k in range(rows):
        for g in range(n_gates):
            d = _at(dst, k * n_gates * n + g * n)
            s = _at(src, k * n_gates * hsz + g * hsz + lo)
            for c in range(n):
                d[c] = s[c]


@njit(**_INLINE)
def _hand_over_c(dst, src, hidden, hoff):
    """Worker 1's units' c (every LSTM layer) from its h buffer src into worker 0's dst: each
    worker keeps only its own units' c, and worker 0 goes on alone."""
    for layer in range(hidden.shape[0]):
        hsz = hidden[layer]
        lo, hi = _units(1, True, hsz)
        d = _at(dst, hoff[layer] + hsz)
        c = _at(src, hoff[layer] + hsz)
        for j in range(lo, hi):
            d[j] = c[j]


@njit(**_INLINE)
def _units(me, paired, hsz):
    """The units [lo, hi) worker ``me`` owns in a layer of hsz units (all when alone)."""
    if not paired:
        return 0, hsz
    mid = hsz // 2
    return (0, mid) if me == 0 else (mid, hsz)


@njit(**_OPTS)
def _worker(sync, info, join_cycles, ev, s, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
            wx, wh, b, bhn, peep, wo, bo, hbuf, hoff, priv, hmax, rh, panel, poff):
    """One of the two workers of ``step_stream_split`` (see the module docstring).

    hbuf (4, HS): each worker's copy of the layers' h (an LSTM's h and c, as in the state
    row), double-buffered (rows 2 me and 2 me + 1), layer l at hoff[l]: its own units written
    by its gates, the partner's copied from the partner's mailbox in sync (``_post``,
    ``_fetch``); priv (2, P): each worker's acc
    and accn; rh: a GRU's r * h; panel (2, P): each worker's packed weights (``_pack``), layer
    l's input weights at poff[2 l], its recurrent ones at poff[2 l + 1]. Worker 0 watches the barriers' cost (and worker 1's flag) and, when pairing
    does not pay, goes on alone after the current event; worker 1 then leaves."""
    role = _join(sync, join_cycles)
    if role == _EXIT:
        return
    if role == _ALONE:
        info[0] = _SOLO  # the caller steps the run (single.step_stream) once both have left
        return
    paired = True
    me = role
    n_layers = hidden.shape[0]
    lstm = cell == LSTM
    row = _at(_data(state), s * state.shape[1])
    prow = _at(_data(pred), s * pred.shape[1])
    n_out = pred.shape[1]
    acc = _at(_data(priv), me * priv.shape[1])
    accn = _at(acc, 4 * hmax)
    hstride = hbuf.shape[1]
    hb = _at(_data(hbuf), 2 * me * hstride)
    syncf = sync.view(np.float32)
    lines = _mail_lines(hmax)
    rhp = _data(rh)
    plain = _plain_layers(cell, hidden, peep)
    n_feat = wx[0].shape[0]
    n_gates = _n_gates(cell)
    pan = _at(_data(panel), me * panel.shape[1])
    # The state's h (and c) go to buffer 1: step 0 reads it (every unit's h).
    for layer in range(n_layers):
        lo, hi = _units(me, paired, hidden[layer])
        n_in = n_feat if layer == 0 else hidden[layer - 1]
        _pack(_at(pan, poff[2 * layer]), _item_data(wx, layer), n_in, n_gates, hidden[layer], lo, hi - lo)
        _pack(_at(pan, poff[2 * layer + 1]), _item_data(wh, layer), hidden[layer], n_gates, hidden[layer], lo, hi - lo)
        src = _at(row, offsets[layer])
        h1 = _at(hb, hstride + hoff[layer])
        for j in range(hidden[layer]):
            h1[j] = src[j]
            if lstm:
                h1[hidden[layer] + j] = src[hidden[layer] + j]
    epoch = 0
    waited = 0
    longest = 0
    if paired:
        epoch += 1
        _barrier(sync, me, epoch)
    began = _cycles()
    xs0 = _data(xs)
    out0 = _data(out)
    n_ev = ev.shape[0]
    for i in range(n_ev):
        e = ev[i]
        if me == 0 and mode == OUT_BEFORE:
            for j in range(n_out):
                out0[e * out.shape[1] + j] = prow[j]
        cur = _at(hb, (i & 1) * hstride)
        prev = _at(hb, (1 - (i & 1)) * hstride)
        x = _at(xs0, e * xs.shape[1] + xo)
        nx = n_feat
        for layer in range(n_layers):
            hsz = hidden[layer]
            lo, hi = _units(me, paired, hsz)
            hnew = _at(cur, hoff[layer])
            if paired:  # this worker's panel
                px, ph, wseg = _at(pan, poff[2 * layer]), _at(pan, poff[2 * layer + 1]), hi - lo
            else:  # worker 0 alone: every unit, from the model's weights
                px, ph, wseg = _item_data(wx, layer), _item_data(wh, layer), hsz
            epoch, w = _layer_units(sync, me, paired, epoch, cell, reset_after, (plain >> layer) & 1, lo, hi, x, nx,
                                    _at(prev, hoff[layer]), hnew, hsz, px, ph, n_gates * wseg, wseg,
                                    _item_data(b, layer), _item_data(bhn, layer), _item_data(peep, layer), acc, accn,
                                    rhp)
            waited += w
            longest = max(longest, w)
            if paired:
                if layer == n_layers - 1 and i >= 2 and join_cycles >= 0:
                    # Decided before this event's last barrier, so the partner reads it after.
                    slow = _slow(i, waited, longest, _cycles() - began)
                    if me == 1 and slow:
                        _store_release(sync, _SLOW, 1)
                    elif me == 0 and (slow or _load_acquire(sync, _SLOW) != 0 or i == _health()[5]):
                        _store_release(sync, _STOP, epoch + 1)
                epoch += 1
                _post(sync, syncf, _mail_line(lines, me, epoch), hnew, lo, hi, epoch)
                plo, phi = _units(1 - me, paired, hsz)
                w = _fetch(sync, syncf, _mail_line(lines, 1 - me, epoch), hnew, plo, phi, epoch)
                # Own the slot of this worker's next post while computing, not when posting:
                # it holds epoch - 1's h, which the partner copied before posting this one.
                _own(syncf, _mail_line(lines, me, epoch + 1), lines)
                waited += w
                longest = max(longest, w)
            x = hnew
            nx = hsz
        # The stop is tagged with its barrier: worker 0 may already have set a later one.
        if paired and _load_acquire(sync, _STOP) == epoch:
            if me == 1:
                # Worker 0 steps every unit from the next event on: it needs this worker's c.
                if lstm:
                    _hand_over_c(_at(_data(hbuf), (i & 1) * hstride), cur, hidden, hoff)
                _store_release(sync, _HANDOFF, 1)
                return
            paired = False
            _wait(sync, _HANDOFF, 1)
        if me == 0:
            matvec(prow, _data(bo), x, nx, _data(wo), wo.shape[1], x, 0, _data(wo), wo.shape[1], n_out)
            if mode == OUT_AFTER:
                for j in range(n_out):
                    out0[e * out.shape[1] + j] = prow[j]
    if me == 0:
        info[0] = _load_acquire(sync, _MODE)
        info[1] = _load_acquire(sync, _STOP)
        info[2] = waited
        info[3] = _cycles() - began
    # Back to the state row: this worker's units of the last event's h (and c).
    if n_ev > 0:
        last = _at(hb, ((n_ev - 1) & 1) * hstride)
        for layer in range(n_layers):
            lo, hi = _units(me, paired, hidden[layer])
            dst = _at(row, offsets[layer])
            h = _at(last, hoff[layer])
            for j in range(lo, hi):
                dst[j] = h[j]
                if lstm:
                    dst[hidden[layer] + j] = h[hidden[layer] + j]


@njit(**_INLINE)
def _mail_lines(hmax):
    """Mailbox lines a slot needs: the larger half of the widest layer."""
    return ((hmax + 1) // 2 + MAIL_FLOATS - 1) // MAIL_FLOATS


@njit(**_OPTS)
def _aligned(n):
    """n float32 starting on a 64-byte line (the two workers' parts never share a line at
    the start)."""
    base = np.zeros(n + 16, np.float32)
    skip = ((64 - _address(_data(base)) % 64) % 64) // 4
    return base[skip:skip + n]


@njit(**_PAR_OPTS)
def _pair(sync, info, join_cycles, ev, s, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
          wx, wh, b, bhn, peep, wo, bo, hbuf, hoff, priv, hmax, rh, panel, poff):
    """The two workers as a parallel region, and nothing else in it (Numba's parallel
    passes take seconds per statement they analyse, cold)."""
    for w in prange(2):
        _worker(sync, info, join_cycles, ev, s, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
                wx, wh, b, bhn, peep, wo, bo, hbuf, hoff, priv, hmax, rh, panel, poff)


@njit(**_OPTS)
def step_stream_split(ev, rows, xs, xo, state, pred, out, mode, info, join_cycles, cell, reset_after, hidden, offsets,
                      wx, wh, b, bhn, peep, wo, bo, acc, accn, rh):
    """``single.step_stream`` (same arguments, results and bits; acc, accn and rh are its
    scratch, used when the run goes alone) with each layer's units split between two threads; ``join_cycles`` bounds the start handshake
    (negative: both workers wait for each other however long it takes and stay paired to
    the end, for tests only: with one Numba thread that never returns).

    info (int64, 4) receives how it went: the run mode (1 paired, 2 one worker from the
    start), the barrier epoch after which worker 0 went on alone (0: never), the cycles
    worker 0 waited at barriers and the cycles its run took. A run that did not pay pauses
    ``split_worth`` for a while."""
    n_layers = hidden.shape[0]
    hmax = 1
    hs = 0
    hoff = np.empty(n_layers, np.int64)
    for layer in range(n_layers):
        hoff[layer] = hs
        width = 2 * hidden[layer] if cell == LSTM else hidden[layer]
        hs += (width + 15) // 16 * 16  # each layer's block from a line of its own
        hmax = max(hmax, hidden[layer])
    hmax = (hmax + 15) // 16 * 16
    p = 5 * hmax  # acc (4 * hmax), accn (hmax)
    # Each worker's panel: every layer's input and recurrent weights for the larger half's
    # units, each block from a line of its own.
    n_gates = _n_gates(cell)
    poff = np.empty(2 * n_layers, np.int64)
    ps = 0
    for layer in range(n_layers):
        half = (hidden[layer] + 1) // 2
        n_in = wx[0].shape[0] if layer == 0 else hidden[layer - 1]
        poff[2 * layer] = ps
        ps += (n_in * n_gates * half + 15) // 16 * 16
        poff[2 * layer + 1] = ps
        ps += (hidden[layer] * n_gates * half + 15) // 16 * 16
    panel = _aligned(2 * ps).reshape(2, ps)
    hbuf = _aligned(4 * hs).reshape(4, hs)
    priv = _aligned(2 * p).reshape(2, p)
    rhs = _aligned(hmax)
    # The sync words and the mailboxes (4 slots), 64-byte aligned so each sits on lines of its own.
    sync = _aligned(2 * (MAIL_WORD0 + 4 * 8 * _mail_lines(hmax))).view(np.int64)
    began = _cycles()
    _pair(sync, info, join_cycles, ev, rows[0], xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
          wx, wh, b, bhn, peep, wo, bo, hbuf, hoff, priv, hmax, rhs, panel, poff)
    _remember(info, _cycles() - began)
    if info[0] == _SOLO:
        step_stream(ev, rows, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets, wx, wh, b, bhn,
                    peep, wo, bo, acc, accn, rh)


@njit(**_INLINE)
def _remember(info, took):
    """Pause splitting for a while (doubling while runs keep failing) after a run that did not
    pay: the partner did not come or stopped keeping up, worker 0 waited at the barriers for
    3/10 of the run (a healthy split waits 3-15%: the partner ran slow), or starting and
    ending the parallel region cost a tenth of the run (its threads asleep or preempted)."""
    health = _health()
    health[2] += 1
    run = info[3] if info[0] == _PAIRED else 0
    ok = info[0] == _PAIRED and info[1] == 0 and 10 * info[2] < 3 * run and 10 * (took - run) < run
    if ok:
        health[1] = 0
        return
    health[3] += 1
    waste = took - run + (info[2] if info[0] == _PAIRED else 0)  # region overhead and barrier waits
    if waste < CHEAP_FAILURE:
        # The partner was asleep (the pool idles between runs) or late, and the region cost
        # little: try again next run, or every run after an idle spell would fail.
        return
    backoff = min(max(2 * health[1], BACKOFF_MIN), BACKOFF_MAX)
    health[1] = backoff
    health[0] = _cycles() + backoff


@njit(**_OPTS)
def split_worth(n_events, n_threads, hidden, wx, wh):
    """Whether a run of ``n_events`` of one stream should take ``step_stream_split``;
    ``n_threads`` is the caller's ``numba.get_num_threads()`` (calling it in here would make
    the kernel uncacheable)."""
    if n_threads < 2 or n_events < MIN_EVENTS or _health()[4] == 0:
        return False
    if _cycles() < _health()[0]:
        return False  # a recent run did not pay
    n_layers = hidden.shape[0]
    weights = 0
    for layer in range(n_layers):
        weights += wx[layer].size + wh[layer].size
    return weights >= MIN_LAYER_WEIGHTS * n_layers


@njit(**_OPTS)
def step_stream_run(ev, rows, xs, xo, state, pred, out, mode, n_threads, cell, reset_after, hidden, offsets,
                    wx, wh, b, bhn, peep, wo, bo, acc, accn, rh):
    """``single.step_stream`` for one stream's run of events ev: split between two threads
    (``step_stream_split``) when ``split_worth`` says so, on the calling thread otherwise.
    The same bits either way."""
    if split_worth(ev.shape[0], n_threads, hidden, wx, wh):
        step_stream_split(ev, rows, xs, xo, state, pred, out, mode, np.zeros(4, np.int64), JOIN_CYCLES, cell,
                          reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, acc, accn, rh)
    else:
        step_stream(ev, rows, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets, wx, wh, b, bhn,
                    peep, wo, bo, acc, accn, rh)
