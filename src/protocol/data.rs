//! The DATA scanner: finds the end of a message, removes dot-stuffing and applies the bare CR/LF
//! policy. It is the DATA phase's own small receiver (STYLE habit 2): it carries no bytes across
//! reads, only a state of a few bits, so a body split at any offset scans exactly like one whole.
//!
//! Rules (RFC 5321 4.1.1.4, 4.5.2): the data is a sequence of lines ending in CRLF; the 354 reply
//! counts as the start of the first line. A line that is exactly `.` ends the data, so the end
//! marker is `<CRLF>.<CRLF>` (or `.<CRLF>` right after the 354). A line that starts with `.` and
//! has more characters loses that first dot (dot-unstuffing). The body handed over is the unstuffed
//! text up to and including the CRLF before the final `.`.
//!
//! Policy on bare CR and bare LF (SMTP smuggling, CVE-2023-51764 and friends): a CR not followed by
//! LF, or an LF not preceded by CR, never ends a line here, so `\n.\n`, `\r.\r`, `\r\n.\n`,
//! `\n.\r\n` and similar never end the data: only `<CRLF>.<CRLF>` does. A message that contains
//! any bare CR or bare LF is read to its real end and then rejected whole with
//! `550 5.6.11 Message contains bare CR or LF; lines must end with CRLF`; nothing of it is stored.
//! Rejecting rather than passing the bytes on means no downstream system, however lenient, can be
//! fooled into seeing two messages in one.
//!
//! Zero copy: the scanner never copies the body. It hands the unstuffed body to a sink as slices
//! of its input (segments), in order, like httparse hands out borrowed headers; copying is the
//! consumer's job. The session copies the segments into its body buffer for a durable store, and
//! only counts them when the store discards.
//!
//! Speed: the scanner works in stretches of up to 8 KiB, each judged and then handed out while
//! it is still in the cache. Only two things need the state machine: an LF followed by a dot
//! (dot-unstuffing and the end marker) and a pair that breaks "CR if and only if LF follows"
//! (bare CR/LF). A kernel looks at every byte pair of the stretch for both; no per-line work
//! happens outside dot-started lines. Four kernels give the same answers:
//! - on a CPU with AVX-512 (where it runs at full clock) or AVX2, checked once at run time, one
//!   fused pass over 64 pairs at a time, with pulp's safe intrinsics (its token proves the CPU
//!   has the extension, so `protocol/` still forbids unsafe code); a block without a mark costs
//!   three compares into bit masks and two mask operations with AVX-512 on Intel's cores, eight
//!   256-bit compares and four three-input logic operations with AVX-512 on AMD's Zen 4 (which
//!   runs compares into masks at half the rate; see `Avx512Vl`), about a dozen vector
//!   instructions with AVX2;
//! - elsewhere, a `memchr::memmem` search for LF-then-dot, then a branch-free pass the compiler
//!   vectorizes (SSE2 on the x86-64 baseline) for bare CR/LF over the pairs before it. A fused
//!   pass in SSE2 was measured slower than these two.
//!
//! Memory: the scanner holds no body. Once the body is known to be rejected (over the size limit
//! or containing a bare CR/LF) it stops handing out segments, while it keeps counting the
//! unstuffed length and looking for the end; the consumer should then free what it kept.

use std::ops::ControlFlow;

/// Where the scanner is, relative to the lines of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (after the 354 or after a CRLF).
    LineStart,
    /// Inside a line; the last byte was not a CR.
    Mid,
    /// Inside a line; the last byte was a CR (emitted), its LF not yet seen.
    Cr,
    /// A line started with `.` (dropped: it is either stuffing or the end marker).
    Dot,
    /// A line started with `.` then CR (the CR is held back: it may be part of the end marker).
    DotCr,
    /// The end marker has been seen.
    Done,
}

/// Scans one message body; create a new one for each DATA.
#[derive(Debug, Clone)]
pub struct DataScanner {
    state: State,
    /// A bare CR or bare LF has been seen.
    bare: bool,
    /// Unstuffed body length so far, counted even when no longer kept.
    len: u64,
    /// Keep at most this many body bytes.
    max: u64,
    /// The kernel of this CPU (picked once per process). Tests set it to run each kernel the
    /// machine has.
    simd: Simd,
}

impl DataScanner {
    /// A scanner positioned right after the 354 reply; bodies over `max` bytes are flagged.
    pub fn new(max: u64) -> DataScanner {
        DataScanner {
            state: State::LineStart,
            bare: false,
            len: 0,
            max,
            simd: Simd::best(),
        }
    }

    /// The kernel this scanner runs: "avx512", "avx512vl", "avx2" or "portable".
    pub fn kernel(&self) -> &'static str {
        self.simd.name()
    }

    /// The names of the kernels this CPU can run, the one `new` picks among them. For benchmarks
    /// that measure every kernel, not only this machine's: a kernel the host does not pick is
    /// otherwise never timed.
    #[doc(hidden)]
    pub fn kernels() -> Vec<&'static str> {
        Simd::all().into_iter().map(Simd::name).collect()
    }

    /// As `new`, with the kernel named (one of `kernels()`) rather than the best; `None` when
    /// this CPU cannot run it.
    #[doc(hidden)]
    pub fn with_kernel(max: u64, kernel: &str) -> Option<DataScanner> {
        let simd = Simd::all().into_iter().find(|k| k.name() == kernel)?;
        Some(DataScanner::with_simd(simd, max))
    }

    /// As `new`, with the given kernel whatever the CPU would pick.
    fn with_simd(simd: Simd, max: u64) -> DataScanner {
        DataScanner {
            simd,
            ..DataScanner::new(max)
        }
    }

    /// True when the message contains a bare CR or bare LF (policy: reject with 550 5.6.11).
    pub fn bare_cr_lf(&self) -> bool {
        self.bare
    }

    /// True when the unstuffed body is longer than the limit (552 5.3.4).
    pub fn too_big(&self) -> bool {
        self.len > self.max
    }

    /// Unstuffed body length seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no body byte has been seen yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True once the end marker has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// True when the body is being discarded (too big or bare CR/LF): it will be rejected.
    pub fn rejecting(&self) -> bool {
        self.bare || self.too_big()
    }

    /// Scans `input`, handing the unstuffed body to `sink` as slices of `input`, in order
    /// (unless the message is already known to be rejected; a segment that first makes it too big
    /// is not handed out). The concatenation of all segments over all calls is the body, whatever
    /// the split of the data into inputs. Returns `Some(consumed)` when the end marker ends at
    /// `input[consumed - 1]`, or `None` when all of `input` belongs to the body so far.
    pub fn scan(&mut self, input: &[u8], mut sink: impl FnMut(&[u8])) -> Option<usize> {
        let n = input.len();
        // The next byte to look at, and the start of the body bytes not yet handed out.
        let mut i = 0;
        let mut from = 0;
        // A body starts at a line start, and so do most reads after the first; without a dot
        // there, the first turn of the loop below only sets `Mid`. Set here, it spares that
        // turn's jump through the `match`'s table, a few percent of a 1 KB body.
        if self.state == State::LineStart && input.first().is_some_and(|&b| b != b'.') {
            self.state = State::Mid;
        }
        loop {
            match self.state {
                State::Done => return Some(i),
                State::LineStart => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'.' {
                        self.emit(&input[from..i], &mut sink);
                        i += 1;
                        from = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\r' {
                        // Held back (not handed out) until its LF decides: `from` stays on it.
                        i += 1;
                        self.state = State::DotCr;
                    } else {
                        // A stuffed dot: already dropped; the rest is an ordinary line.
                        self.state = State::Mid;
                    }
                }
                State::DotCr => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\n' {
                        // The end marker; its dot and CR were never part of the body.
                        self.state = State::Done;
                        return Some(i + 1);
                    }
                    // `.` CR then not LF: the CR was bare and belongs to the (stuffed) line. When
                    // it is in this input it is already the first pending byte (`from`); when it
                    // ended the previous input, it has to be handed out on its own.
                    self.bare = true;
                    if i == 0 {
                        self.emit(b"\r", &mut sink);
                    }
                    self.state = State::Mid;
                }
                State::Cr => {
                    if i == n {
                        break;
                    }
                    if input[i] == b'\n' {
                        i += 1;
                        self.state = State::LineStart;
                    } else {
                        self.bare = true;
                        self.state = State::Mid;
                    }
                }
                State::Mid => {
                    if i == n {
                        break;
                    }
                    // The whole fast path, hand-out closure included, is compiled for the vector
                    // extension and inlined into one function that runs only on a CPU that has it
                    // (see `FastPath`); `kernel` makes the extension's kernel.
                    #[cfg(target_arch = "x86_64")]
                    macro_rules! vectorized {
                        ($simd:ident, $kernel:expr) => {
                            $simd.vectorize(FastPath {
                                scanner: self,
                                kernel: $kernel,
                                input,
                                i,
                                from: &mut from,
                                sink: &mut sink,
                            })
                        };
                    }
                    let found = match self.simd {
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx512(simd) => {
                            vectorized!(simd, |roomy| Vector(Avx512 { simd, roomy }))
                        }
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx512Vl(simd) => vectorized!(simd, |roomy| Avx512Vl { simd, roomy }),
                        #[cfg(target_arch = "x86_64")]
                        Simd::Avx2(simd) => vectorized!(simd, |roomy| Vector(Avx2 { simd, roomy })),
                        Simd::Portable => self.blocks(Portable, input, i, &mut from, &mut sink),
                    };
                    match found {
                        Ok(end) => return Some(end),
                        Err(next) => i = next,
                    }
                }
            }
        }
        // A CR held back after a line-start dot is not body (yet): it is the only pending byte.
        if self.state != State::DotCr {
            self.emit(&input[from..], &mut sink);
        }
        None
    }

    /// `blocks` with a vector kernel, made by `kernel` from whether the body can outgrow its limit
    /// in this input (see `Blocks::roomy`), on local copies of the scanner and of `from`, which
    /// the optimizer keeps in registers: through `self` and `from` every hand-out would be a
    /// memory round trip.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn fast<K: Kernel>(
        &mut self,
        kernel: impl FnOnce(bool) -> K,
        input: &[u8],
        i: usize,
        from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, usize> {
        let (mut me, mut at) = (self.clone(), *from);
        // Every byte this call hands out is in `input[at..]`.
        let pending = (input.len() - at) as u64;
        let roomy = me.len.checked_add(pending).is_some_and(|l| l <= me.max);
        let found = me.blocks(kernel(roomy), input, i, &mut at, sink);
        (*self, *from) = (me, at);
        found
    }

    /// The fast path, entered inside a line whose last byte was not a CR (state `Mid`). Works one
    /// stretch of up to `STRETCH` bytes at a time, so that each stretch is searched, checked and
    /// handed out while it is in the cache. The kernel `k` judges every byte pair of the stretch
    /// for bare CR/LF and hands each LF-then-dot (the only place where the line structure
    /// matters: dot-unstuffing and the end marker) to `dot_line`. A stuffed dot is dropped
    /// without leaving the loop (the body bytes before it are handed out). Returns
    /// `Ok(consumed)` at the end marker, or `Err(next)` with the state set: at the end of
    /// `input`, or at a line-start dot whose meaning the next read decides.
    #[inline(always)]
    fn blocks<K: Kernel>(
        &mut self,
        k: K,
        input: &[u8],
        start: usize,
        from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> Result<usize, usize> {
        let n = input.len();
        // The byte before `start` was not a CR, so an LF first is bare.
        if input[start] == b'\n' {
            self.bare = true;
        }
        // An input that ends with the end marker (a whole message in one read, as most are) is
        // judged up to the marker's first CRLF, whose LF then starts the marker's line: unless
        // an earlier marker ends the data, the last one does, and the kernel need not find its
        // dot. That spares the walk of the last block, whose latency nothing else overlaps
        // (about 8% of a 1 KB body, Zen 4). The marker's own pairs are never bare.
        let marked_end = n >= start + 5 && input.ends_with(b"\r\n.\r\n");
        let end = if marked_end { n - 3 } else { n };
        // Judge the pairs from `i` on; body bytes before `*from` are handed out.
        let mut i = start;
        loop {
            let stop = (i + STRETCH).min(end);
            // The pairs starting in the stretch, the last one reaching one byte past it, so that
            // an LF at its end is judged with what follows; a pair needs both of its bytes.
            let to = stop.min(end - 1);
            if i < to {
                if let ControlFlow::Break(r) = k.pairs(self, input, start, i, to, from, sink) {
                    return r;
                }
            }
            if marked_end && stop == end {
                // The body ends with the CRLF before the marker's dot.
                self.emit(&input[*from..end], sink);
                self.state = State::Done;
                return Ok(n);
            }
            if stop < n {
                // A stuffed dot as the stretch's last byte was dropped: the next body byte is
                // past the stretch.
                if *from < stop {
                    self.emit(&input[*from..stop], sink);
                    *from = stop;
                }
                i = stop;
                continue;
            }
            let prev_is_cr = n - 1 > start && input[n - 2] == b'\r';
            self.state = match input[n - 1] {
                b'\r' => State::Cr,
                b'\n' if prev_is_cr => State::LineStart,
                _ => State::Mid,
            };
            return Err(n);
        }
    }

    /// An LF at `input[lf]` followed by a dot, found by a kernel of `blocks` (entered at `start`)
    /// once every pair before it has been judged. Continues (with the pair of the dot) after a
    /// stuffed dot, dropped here, or after a dot that follows a bare LF and so starts no line;
    /// breaks with `blocks`' answer at the end marker, or when the input ends too early to tell.
    #[inline(always)]
    fn dot_line(
        &mut self,
        input: &[u8],
        start: usize,
        lf: usize,
        from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        if !(lf > start && input[lf - 1] == b'\r') {
            // A bare LF (already flagged): the dot does not start a line; it is content.
            return ControlFlow::Continue(());
        }
        self.line_dot(input, lf + 1, from, sink)
    }

    /// A dot at `input[dot]` that starts a line (after a CRLF), the rest as for `dot_line`.
    #[inline(always)]
    fn line_dot(
        &mut self,
        input: &[u8],
        dot: usize,
        from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        self.emit(&input[*from..dot], sink);
        *from = dot;
        if dot + 2 >= input.len() {
            // Too close to the end of the input to tell a stuffed dot from the end marker.
            self.state = State::LineStart;
            return ControlFlow::Break(Err(dot));
        }
        if input[dot + 1] == b'\r' && input[dot + 2] == b'\n' {
            self.state = State::Done;
            return ControlFlow::Break(Ok(dot + 3));
        }
        // A stuffed dot: drop it. The kernel judges the pair it starts next (an LF right after
        // the dot is bare).
        *from = dot + 1;
        ControlFlow::Continue(())
    }

    /// Counts body bytes and hands them to `sink` unless the message is rejected.
    #[inline(always)]
    fn emit(&mut self, bytes: &[u8], sink: &mut impl FnMut(&[u8])) {
        if bytes.is_empty() {
            return;
        }
        self.len = self.len.saturating_add(bytes.len() as u64);
        if !self.rejecting() {
            sink(bytes);
        }
    }
}

/// `DataScanner::fast` with its arguments, as pulp's `vectorize` takes it: the code it runs is
/// compiled for the vector extension only where it is inlined into `vectorize`'s target-feature
/// function. A closure there is called through `FnOnce::call_once`, which LLVM inlines or not
/// by its own measure: when a change to `blocks` made the AVX2 instantiation larger, it stopped
/// inlining it, every intrinsic became a call and the kernel ran 80 times slower. `call` here is
/// marked to be inlined, so the whole fast path always is.
#[cfg(target_arch = "x86_64")]
struct FastPath<'a, M, S> {
    scanner: &'a mut DataScanner,
    /// Makes the kernel, from whether the body is roomy (see `Blocks::roomy`).
    kernel: M,
    input: &'a [u8],
    i: usize,
    from: &'a mut usize,
    sink: &'a mut S,
}

#[cfg(target_arch = "x86_64")]
impl<K, M, S> pulp::NullaryFnOnce for FastPath<'_, M, S>
where
    K: Kernel,
    M: FnOnce(bool) -> K,
    S: FnMut(&[u8]),
{
    type Output = Result<usize, usize>;

    #[inline(always)]
    fn call(self) -> Self::Output {
        let FastPath {
            scanner,
            kernel,
            input,
            i,
            from,
            sink,
        } = self;
        scanner.fast(kernel, input, i, from, sink)
    }
}

/// Body bytes searched and checked before they are handed out, at most.
const STRETCH: usize = 8 * 1024;

/// The searcher for an LF followed by a dot, built once per process.
fn dot_line_finder() -> &'static memchr::memmem::Finder<'static> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\n."))
}

/// One way of looking at the byte pairs of a stretch (the fast path of `DataScanner::blocks`).
trait Kernel: Copy {
    /// Judges the byte pairs `(input[j], input[j + 1])` for `j` in `from..to` (`from < to <
    /// input.len()`), in order: a pair that breaks "CR if and only if LF follows" sets `s.bare`,
    /// and an LF-then-dot pair goes to `s.dot_line`, once `s.bare` is up to date with the pairs
    /// before it. Stops at the first `Break` of `dot_line` and returns it: the pairs after it
    /// are not judged (the end marker may follow, and then the next commands, which are not part
    /// of this message).
    #[allow(clippy::too_many_arguments)]
    fn pairs(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        from: usize,
        to: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>>;
}

/// The kernel for any CPU: a `memmem` search for LF-then-dot (memchr picks its vector width at
/// run time), then the compiler-vectorized bare CR/LF pass (SSE2 on the x86-64 baseline) over the
/// pairs before it.
#[derive(Clone, Copy)]
struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    fn pairs(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        from: usize,
        to: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        let mut i = from;
        while i < to {
            let found = dot_line_finder().find(&input[i..=to]).map(|k| i + k);
            // The pairs before an LF-dot end with the one that ends at the LF.
            let judged = found.unwrap_or(to);
            if !s.bare && has_bare_cr_lf(&input[i..=judged]) {
                s.bare = true;
            }
            let Some(lf) = found else {
                break;
            };
            s.dot_line(input, start, lf, body_from, sink)?;
            i = lf + 1;
        }
        ControlFlow::Continue(())
    }
}

/// The kernels a scanner can run: the vector ones only where the CPU has their extension, which
/// their pulp token proves (it cannot be made otherwise).
#[derive(Debug, Clone, Copy)]
enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
    #[cfg(target_arch = "x86_64")]
    Avx512(pulp::x86::V4),
    #[cfg(target_arch = "x86_64")]
    Avx512Vl(pulp::x86::V4),
}

impl Simd {
    /// Every kernel this CPU can run, the portable one last (AVX-512 even where `best` would not
    /// pick it).
    fn all() -> Vec<Simd> {
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(v4) = pulp::x86::V4::try_new() {
                all.push(Simd::Avx512(v4));
                all.push(Simd::Avx512Vl(v4));
            }
            if let Some(v3) = pulp::x86::V3::try_new() {
                all.push(Simd::Avx2(v3));
            }
        }
        all.push(Simd::Portable);
        all
    }

    fn name(self) -> &'static str {
        match self {
            Simd::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512(_) => "avx512",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vl(_) => "avx512vl",
        }
    }

    /// The fastest kernel this CPU runs: AVX-512 (x86-64-v4, see `avx512_token`; on 256-bit
    /// vectors on Zen 4, see `Avx512Vl`), else AVX2 (x86-64-v3), else the portable one. Asked once per process: the token checks are a dozen
    /// CPUID bits each.
    fn best() -> Simd {
        static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(v4) = avx512_token() {
                    return if zen4() {
                        Simd::Avx512Vl(v4)
                    } else {
                        Simd::Avx512(v4)
                    };
                }
                if let Some(v3) = pulp::x86::V3::try_new() {
                    return Simd::Avx2(v3);
                }
            }
            Simd::Portable
        })
    }
}

/// The AVX-512 token, only on a CPU whose 512-bit instructions do not slow the core down. On
/// Skylake-SP and Cascade Lake Xeons a core that runs 512-bit instructions drops to a lower
/// clock for about a millisecond after them, which a server that scans every message would pay
/// in all its other work; Intel's cores from Ice Lake on, and AMD's Zen 4, run them at full
/// speed. Those are the CPUs with AVX-512 VBMI2 (simdjson picks its AVX-512 kernel by the same
/// sign); the others get the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
fn avx512_token() -> Option<pulp::x86::V4> {
    if !std::arch::is_x86_feature_detected!("avx512vbmi2") {
        return None;
    }
    pulp::x86::V4::try_new()
}

/// True on AMD's Zen 4 (family 19h; its other members, Zen 3, have no AVX-512), where the
/// `Avx512Vl` kernel is the faster one (see there). Zen 5 (family 1Ah), which has 512-bit data
/// paths, is not included: it was never measured, and its figures may well favour `Avx512`.
/// `cpuid` is safe to execute on any x86-64 CPU.
#[cfg(target_arch = "x86_64")]
fn zen4() -> bool {
    use std::arch::x86_64::__cpuid;
    let vendor = __cpuid(0);
    // "AuthenticAMD", in the order the registers hold it.
    let amd = (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
    let sig = __cpuid(1).eax;
    let family = (sig >> 8 & 0xF) + (sig >> 20 & 0xFF);
    amd && family == 0x19
}

/// Positions (and byte pairs) in one block of a vector kernel.
#[cfg(target_arch = "x86_64")]
const PAIRS: usize = 64;

/// One vector extension's view of blocks of 64 byte pairs, for the vector kernel (`Vector`'s
/// `pairs`): each position `q` of a block is compared at three offsets, `c = (input[q - 1] ==
/// CR)`, `d = (input[q] == LF)` and `e = (input[q + 1] == '.')`, so that one LF comparison
/// serves both questions: `c ^ d` marks a bare pair `(q - 1, q)` (the bare lane of `q`), and
/// `d & e` an LF-dot pair `(q, q + 1)` (its dot lane). A block with neither (nearly every block
/// of a normal body) is skipped; only a marked one is turned into bit masks and walked
/// (`Marks`). pulp's token proves that the CPU has the extension, which makes its intrinsics safe
/// to call; they inline only inside the token's `vectorize` (so the closure given to it must stay
/// small enough for LLVM to inline: when it did not, in a trial, every intrinsic became a call
/// and the scanner some 100 times slower).
#[cfg(target_arch = "x86_64")]
trait Blocks: Copy {
    /// The lanes of one block, in whatever form the extension compares into.
    type Lanes: Copy;
    /// Lanes of the 64 positions `base..base + 64` from `w = input[base - 1..base + 65]`: bare
    /// lane `k` is the pair `(base + k - 1, base + k)`, dot lane `k` the pair `(base + k, base + k
    /// + 1)`.
    fn shifted(self, w: &[u8; 66]) -> Self::Lanes;
    /// Lanes of the 64 pairs from `w[0]`, both unshifted: bare lane `k` is the pair `(k, k + 1)`,
    /// like dot lane `k`; for a block with no byte before it.
    fn exact(self, w: &[u8; 65]) -> Self::Lanes;
    /// True when no lane of the block is marked.
    fn clean(self, l: &Self::Lanes) -> bool;
    /// True when no lane of two blocks is marked (one test and branch for both).
    fn clean2(self, l: &Self::Lanes, m: &Self::Lanes) -> bool;
    /// The (bare, dot) lanes as bit masks, lane `k` in bit `k`.
    fn bits(self, l: &Self::Lanes) -> (u64, u64);
    /// The dot lanes of two blocks as one 128-bit mask (`l`'s in the low half) when neither block
    /// has a bare lane.
    fn dots_if_no_bare(self, l: &Self::Lanes, m: &Self::Lanes) -> Option<u128>;
    /// The body cannot outgrow its limit in this input: the scanner's length plus every input
    /// byte from the first one not handed out is within it. Then no segment handed out in this
    /// call makes the body too big, which spares `Marks::line_dots` the test.
    fn roomy(self) -> bool;
    /// Test each block for marks (`Vector::each_block`) rather than each pair of blocks
    /// (`Vector::two_blocks`).
    const TEST_EACH_BLOCK: bool;
}

/// The vector kernels: each CPU extension gives its `Blocks`, the walk over them is shared.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Vector<B>(B);

#[cfg(target_arch = "x86_64")]
impl<B: Blocks> Vector<B> {
    /// Two marked blocks of shifted lanes, from `base` and `base + 64`. When neither has a bare
    /// lane (always, in a well-formed body), every LF of a dot lane is CR-preceded (bare lane `k`
    /// is the pair that ends at the LF of dot lane `k`), so each dot starts a line, and `s.bare`
    /// stays as it is; the dots of both blocks then go to `line_dots`. Otherwise each block is
    /// walked as usual.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk_two(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        l: &B::Lanes,
        m: &B::Lanes,
        base: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        let b = self.0;
        if let Some(dots) = b.dots_if_no_bare(l, m) {
            return Marks::line_dots(b.roomy(), s, input, base, dots, body_from, sink);
        }
        // The two blocks written out, not a loop over `[(l, base), (m, base + PAIRS)]`: with the
        // array, LLVM stored all eight lane vectors to the stack on every marked pair, before
        // the test above that nearly always returns.
        if !b.clean(l) {
            let (bare, dot) = b.bits(l);
            Marks::shifted(b.roomy(), s, input, start, base, bare, dot, body_from, sink)?;
        }
        if !b.clean(m) {
            let (bare, dot) = b.bits(m);
            let at = base + PAIRS;
            Marks::shifted(b.roomy(), s, input, start, at, bare, dot, body_from, sink)?;
        }
        ControlFlow::Continue(())
    }

    /// The whole blocks of `rest` (which starts at the byte before the first position to judge)
    /// while there are two, each pair with one test and branch; for `walk_two`. The clean pairs
    /// are skipped in a loop of their own, in which only `rest` is live, so that the registers
    /// the walk needs are not spilled and reloaded around every clean pair. Returns the bytes
    /// left.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn two_blocks<'a>(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        hay: &[u8],
        mut rest: &'a [u8],
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>, &'a [u8]> {
        let b = self.0;
        loop {
            let marked = loop {
                let Some((w, v)) = two_windows(rest) else {
                    break None;
                };
                let (l, m) = (b.shifted(w), b.shifted(v));
                if !b.clean2(&l, &m) {
                    break Some((l, m));
                }
                rest = &rest[2 * PAIRS..];
            };
            let Some((l, m)) = marked else {
                return ControlFlow::Continue(rest);
            };
            let j = hay.len() - rest.len() + 1;
            self.walk_two(s, input, start, &l, &m, j, body_from, sink)
                .map_continue(|()| rest)?;
            rest = &rest[2 * PAIRS..];
        }
    }

    /// As `two_blocks`, but with a test and branch for each block (two per step of the clean
    /// loop), for an extension whose test of a block is cheap: a body with dot lines then
    /// walks the one marked block, not a pair whose dot may be in either half. Returns the bytes
    /// left, less than two whole blocks.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn each_block<'a>(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        hay: &[u8],
        mut rest: &'a [u8],
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>, &'a [u8]> {
        let b = self.0;
        // As in `Marks::line_dots`: while the body cannot outgrow its limit and has no bare CR or
        // LF, a block whose only marks are stuffed dots is handled here by `Marks::stuffed`, with
        // the length and the start of the pending bytes in registers for the whole walk, not
        // only for one block (they are written back before any other work, which reads them).
        // Measured 12% faster on dot-stuffed 100 KB and 10 MB bodies (BENCHMARKS.md).
        let mut quick = b.roomy() && !s.bare;
        let (mut from, mut len) = (*body_from, s.len);
        // The last dot with two bytes after it, as `line_dot` wants.
        let last = input.len().saturating_sub(3);
        loop {
            let marked = loop {
                let Some((w, v)) = two_windows(rest) else {
                    break None;
                };
                let l = b.shifted(w);
                if !b.clean(&l) {
                    break Some(l);
                }
                let m = b.shifted(v);
                if !b.clean(&m) {
                    rest = &rest[PAIRS..];
                    break Some(m);
                }
                rest = &rest[2 * PAIRS..];
            };
            let Some(l) = marked else {
                (*body_from, s.len) = (from, len);
                return ControlFlow::Continue(rest);
            };
            let j = hay.len() - rest.len() + 1;
            let (bare, mut dot) = b.bits(&l);
            if quick && bare == 0 {
                // Without a bare lane each dot starts a line (see `Vector::walk_two`).
                dot = Marks::stuffed(input, dot, j + 1, last, &mut from, &mut len, sink);
                if dot == 0 {
                    rest = &rest[PAIRS..];
                    continue;
                }
            }
            (*body_from, s.len) = (from, len);
            Marks::shifted(b.roomy(), s, input, start, j, bare, dot, body_from, sink)
                .map_continue(|()| rest)?;
            (from, len) = (*body_from, s.len);
            quick = quick && !s.bare;
            rest = &rest[PAIRS..];
        }
    }
}

/// The windows of the next two blocks, `rest[..66]` and `rest[64..130]`, if `rest` has them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn two_windows(rest: &[u8]) -> Option<(&[u8; PAIRS + 2], &[u8; PAIRS + 2])> {
    let w2 = rest.first_chunk::<{ 2 * PAIRS + 2 }>()?;
    match (w2.first_chunk(), w2.last_chunk()) {
        (Some(w), Some(v)) => Some((w, v)),
        _ => unreachable!("two overlapping windows of a double one"),
    }
}

/// The `N` bytes from `input[at]` (the caller checks that they are there).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn window<const N: usize>(input: &[u8], at: usize) -> &[u8; N] {
    match input.get(at..at + N).map(<&[u8; N]>::try_from) {
        Some(Ok(w)) => w,
        _ => unreachable!("the block lies inside the input"),
    }
}

#[cfg(target_arch = "x86_64")]
impl<B: Blocks> Kernel for Vector<B> {
    #[inline(always)]
    fn pairs(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        from: usize,
        to: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        let b = self.0;
        // Only the bytes of the pairs `..to`, so that a block's bounds check is the loop's test.
        let hay = &input[..=to];
        if to <= PAIRS {
            // A short input: one block of unshifted lanes over a copy padded with NULs, the
            // pairs outside `from..to` masked off.
            let mut pad = [0u8; PAIRS + 1];
            pad[..=to - from].copy_from_slice(&hay[from..]);
            let (bare, dot) = b.bits(&b.exact(&pad));
            let keep = u64::MAX >> (PAIRS - (to - from));
            return Marks::walk(
                s,
                input,
                start,
                from,
                dot & keep,
                bare & keep,
                None,
                body_from,
                sink,
            );
        }
        let mut j = from;
        if j == 0 {
            // No byte before the first pair for the shifted lanes: one block of unshifted ones.
            let l = b.exact(window(hay, 0));
            if !b.clean(&l) {
                let (bare, dot) = b.bits(&l);
                Marks::walk(s, input, start, 0, dot, bare, None, body_from, sink)?;
            }
            j = PAIRS;
        }
        // Whole blocks: the positions `j..j + 64` read `input[j - 1..j + 65]`. Bare lane 0 is
        // the pair `j - 1`, judged again (the previous block's, or the state machine's: `Mid`
        // holds only after a byte whose pair is bare exactly when the entry check says so). The
        // bytes left from `j - 1` are a slice, so that its length test is the only bounds check.
        let mut rest = &hay[j - 1..];
        rest = if B::TEST_EACH_BLOCK {
            self.each_block(s, input, start, hay, rest, body_from, sink)?
        } else {
            self.two_blocks(s, input, start, hay, rest, body_from, sink)?
        };
        if let Some(w) = rest.first_chunk::<{ PAIRS + 2 }>() {
            let l = b.shifted(w);
            if !b.clean(&l) {
                let j = hay.len() - rest.len() + 1;
                let (bare, dot) = b.bits(&l);
                Marks::shifted(b.roomy(), s, input, start, j, bare, dot, body_from, sink)?;
            }
            rest = &rest[PAIRS..];
        }
        let j = hay.len() - rest.len() + 1;
        // The last, partial block: the one that ends at `to`, overlapping positions already
        // judged, which are masked off.
        if j < to {
            let base = to - PAIRS;
            let l = b.shifted(window(hay, base - 1));
            if !b.clean(&l) {
                let keep = u64::MAX << (j - base);
                let (bare, dot) = b.bits(&l);
                Marks::shifted(
                    b.roomy(),
                    s,
                    input,
                    start,
                    base,
                    bare & keep,
                    dot & keep,
                    body_from,
                    sink,
                )?;
            }
        }
        // The last pair, whose bare lane would be in the next block.
        if (input[to - 1] == b'\r') != (input[to] == b'\n') {
            s.bare = true;
        }
        ControlFlow::Continue(())
    }
}

/// The blocks for CPUs with AVX2: a block is two 32-byte halves, each compared at the three
/// offsets. A block costs 6 comparisons (the loads folded into them) and 7 logic operations;
/// two blocks share one `vptest`. Only a marked block turns its lanes into bit masks
/// (`vpmovmskb`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2 {
    simd: pulp::x86::V3,
    /// See `Blocks::roomy`.
    roomy: bool,
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256i, __m512i};

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// One bit per lane of the two halves, lane 0 in bit 0.
    #[inline(always)]
    fn mask(self, lo: __m256i, hi: __m256i) -> u64 {
        let s = self.simd;
        let lo = s.avx2._mm256_movemask_epi8(lo) as u32 as u64;
        let hi = s.avx2._mm256_movemask_epi8(hi) as u32 as u64;
        lo | hi << 32
    }
}

#[cfg(target_arch = "x86_64")]
impl Blocks for Avx2 {
    /// The (bare, dot) lanes of each half.
    type Lanes = [(__m256i, __m256i); 2];
    /// A test costs an `or` of four vectors and a `vptest`: one for two blocks.
    const TEST_EACH_BLOCK: bool = false;

    #[inline(always)]
    fn shifted(self, w: &[u8; 66]) -> Self::Lanes {
        use pulp::bytemuck::pod_read_unaligned as load;
        let s = self.simd;
        let splat = |c: u8| s.avx._mm256_set1_epi8(c as i8);
        let half = |at: usize| {
            let c = s
                .avx2
                ._mm256_cmpeq_epi8(load(&w[at..at + 32]), splat(b'\r'));
            let d = s
                .avx2
                ._mm256_cmpeq_epi8(load(&w[at + 1..at + 33]), splat(b'\n'));
            let e = s
                .avx2
                ._mm256_cmpeq_epi8(load(&w[at + 2..at + 34]), splat(b'.'));
            (s.avx2._mm256_xor_si256(c, d), s.avx2._mm256_and_si256(d, e))
        };
        [half(0), half(32)]
    }

    #[inline(always)]
    fn exact(self, w: &[u8; 65]) -> Self::Lanes {
        use pulp::bytemuck::pod_read_unaligned as load;
        let s = self.simd;
        let splat = |c: u8| s.avx._mm256_set1_epi8(c as i8);
        let half = |at: usize| {
            let a: __m256i = load(&w[at..at + 32]);
            let b: __m256i = load(&w[at + 1..at + 33]);
            let bare = s.avx2._mm256_xor_si256(
                s.avx2._mm256_cmpeq_epi8(a, splat(b'\r')),
                s.avx2._mm256_cmpeq_epi8(b, splat(b'\n')),
            );
            let dot = s.avx2._mm256_and_si256(
                s.avx2._mm256_cmpeq_epi8(a, splat(b'\n')),
                s.avx2._mm256_cmpeq_epi8(b, splat(b'.')),
            );
            (bare, dot)
        };
        [half(0), half(32)]
    }

    #[inline(always)]
    fn clean(self, l: &Self::Lanes) -> bool {
        let s = self.simd;
        let or = |x, y| s.avx2._mm256_or_si256(x, y);
        let any = or(or(l[0].0, l[0].1), or(l[1].0, l[1].1));
        s.avx._mm256_testz_si256(any, any) != 0
    }

    #[inline(always)]
    fn clean2(self, l: &Self::Lanes, m: &Self::Lanes) -> bool {
        let s = self.simd;
        let or = |x, y| s.avx2._mm256_or_si256(x, y);
        let any = or(
            or(or(l[0].0, l[0].1), or(l[1].0, l[1].1)),
            or(or(m[0].0, m[0].1), or(m[1].0, m[1].1)),
        );
        s.avx._mm256_testz_si256(any, any) != 0
    }

    #[inline(always)]
    fn bits(self, l: &Self::Lanes) -> (u64, u64) {
        (self.mask(l[0].0, l[1].0), self.mask(l[0].1, l[1].1))
    }

    #[inline(always)]
    fn dots_if_no_bare(self, l: &Self::Lanes, m: &Self::Lanes) -> Option<u128> {
        let v = self.simd;
        let or = |x, y| v.avx2._mm256_or_si256(x, y);
        let bare = or(or(l[0].0, l[1].0), or(m[0].0, m[1].0));
        if v.avx._mm256_testz_si256(bare, bare) == 0 {
            return None;
        }
        let dots = |l: &Self::Lanes| self.mask(l[0].1, l[1].1);
        Some(u128::from(dots(l)) | u128::from(dots(m)) << 64)
    }

    #[inline(always)]
    fn roomy(self) -> bool {
        self.roomy
    }
}

/// The blocks for CPUs with AVX-512 (F and BW): a block is one 64-byte vector, and its
/// comparisons give bit masks at once (`vpcmpeqb` into a mask register): the LF comparison's
/// mask masks the dot comparison, which so gives the dot lanes with no logic operation. A block
/// costs 3 comparisons (the loads folded into them), one `xor` of masks and a `kortest`. A marked
/// block is already its bit masks.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512 {
    simd: pulp::x86::V4,
    /// See `Blocks::roomy`.
    roomy: bool,
}

#[cfg(target_arch = "x86_64")]
impl Blocks for Avx512 {
    /// (bare, dot) lanes, lane `k` in bit `k`.
    type Lanes = (u64, u64);
    /// One `kortest` a block: faster on dot-stuffed bodies of 1 KB and 100 KB (by 13-31% on a
    /// Xeon, 2026-12-02, BENCHMARKS.md), the same on plain ones.
    const TEST_EACH_BLOCK: bool = true;

    #[inline(always)]
    fn shifted(self, w: &[u8; 66]) -> Self::Lanes {
        use pulp::bytemuck::pod_read_unaligned as load;
        let s = self.simd;
        let splat = |c: u8| s.avx512f._mm512_set1_epi8(c as i8);
        let at = |k: usize| -> __m512i { load(&w[k..k + 64]) };
        let c = s.avx512bw._mm512_cmpeq_epi8_mask(at(0), splat(b'\r'));
        let d = s.avx512bw._mm512_cmpeq_epi8_mask(at(1), splat(b'\n'));
        let dot = s
            .avx512bw
            ._mm512_mask_cmpeq_epi8_mask(d, at(2), splat(b'.'));
        (c ^ d, dot)
    }

    #[inline(always)]
    fn exact(self, w: &[u8; 65]) -> Self::Lanes {
        use pulp::bytemuck::pod_read_unaligned as load;
        let s = self.simd;
        let splat = |c: u8| s.avx512f._mm512_set1_epi8(c as i8);
        let a: __m512i = load(&w[0..64]);
        let b: __m512i = load(&w[1..65]);
        let lf = s.avx512bw._mm512_cmpeq_epi8_mask(a, splat(b'\n'));
        let bare = s.avx512bw._mm512_cmpeq_epi8_mask(a, splat(b'\r'))
            ^ s.avx512bw._mm512_cmpeq_epi8_mask(b, splat(b'\n'));
        let dot = s.avx512bw._mm512_mask_cmpeq_epi8_mask(lf, b, splat(b'.'));
        (bare, dot)
    }

    #[inline(always)]
    fn clean(self, l: &Self::Lanes) -> bool {
        l.0 | l.1 == 0
    }

    #[inline(always)]
    fn clean2(self, l: &Self::Lanes, m: &Self::Lanes) -> bool {
        l.0 | l.1 | m.0 | m.1 == 0
    }

    #[inline(always)]
    fn bits(self, l: &Self::Lanes) -> (u64, u64) {
        *l
    }

    #[inline(always)]
    fn dots_if_no_bare(self, l: &Self::Lanes, m: &Self::Lanes) -> Option<u128> {
        (l.0 | m.0 == 0).then(|| u128::from(l.1) | u128::from(m.1) << 64)
    }

    #[inline(always)]
    fn roomy(self) -> bool {
        self.roomy
    }
}

/// The kernel for AMD's Zen 4 (see `Simd::best`): AVX-512's three-input logic operation
/// (`vpternlogd`, through AVX-512 VL) on 256-bit vectors whose comparisons (`vpcmpeqb` in its
/// AVX2 form) give vectors, not mask registers. On Zen 4, which executes 512-bit operations on
/// 256-bit halves, a comparison into a mask register issues once per cycle whether it covers
/// 32 or 64 bytes, and a 64-byte load that crosses a cache line costs about two aligned ones;
/// the `Avx512` kernel's block (three comparisons into masks, two of its three loads crossing a
/// line) measured 4.9 cycles there, against 3.9 for memchr's `memmem` loop. A 256-bit
/// comparison into a vector issues four times per cycle, so this kernel spends its cycles on
/// comparisons it can issue in parallel and on few loads that cross a line:
/// - a block of 64 pairs is judged in the unshifted layout (`Blocks::exact`'s: lane `k` is the
///   pair `(k, k + 1)` for both questions) from two 32-byte halves, each read at offsets 0 and
///   +1, so only one of its four loads crosses a line (the `Avx2` kernel's three offsets cross
///   two, and that form, even with `vpternlogd`, was bound by its loads: 10% slower);
/// - each half is four comparisons (CR and LF at offset 0, LF and '.' at +1) and two
///   `vpternlogd`: one makes the LF-dot lanes 0x80, the other folds them with the bare lanes
///   (CR at `k` xor LF at `k + 1`), which stay 0xFF. A block is tested with one `or` and one
///   `vptest`; only a marked one turns its lanes into bit masks (`vpmovmskb` of the top bits),
///   and a `vptest` of the low bits tells whether any of them is bare.
///
/// On Intel's cores this form is slower than the `Avx512` kernel's: they run 512-bit
/// comparisons into masks at full rate (on one port), and 256-bit ones on two ports only, so
/// eight of them per block cost more than three 512-bit ones there.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512Vl {
    simd: pulp::x86::V4,
    /// See `Blocks::roomy`.
    roomy: bool,
}

/// One block's lanes for `Avx512Vl`: 32 pairs a half, 0xFF in a bare lane, 0x80 in an LF-dot
/// lane, 0 elsewhere.
#[cfg(target_arch = "x86_64")]
type VlLanes = [__m256i; 2];

#[cfg(target_arch = "x86_64")]
impl Avx512Vl {
    /// The lanes of the 32 pairs `(w[k], w[k + 1])`.
    #[inline(always)]
    fn half(self, w: &[u8; 33]) -> __m256i {
        use pulp::bytemuck::pod_read_unaligned as load;
        let s = self.simd;
        let splat = |c: u8| s.avx._mm256_set1_epi8(c as i8);
        let a: __m256i = load(&w[..32]);
        let b: __m256i = load(&w[1..]);
        let cr = s.avx2._mm256_cmpeq_epi8(a, splat(b'\r'));
        let lf = s.avx2._mm256_cmpeq_epi8(b, splat(b'\n'));
        let lf_first = s.avx2._mm256_cmpeq_epi8(a, splat(b'\n'));
        let dot = s.avx2._mm256_cmpeq_epi8(b, splat(b'.'));
        // The truth tables of `vpternlogd`'s first, second and third operands are 0xF0, 0xCC
        // and 0xAA. Both steps take the comparisons as they are: written as `and` of two
        // comparisons, LLVM turns the pair into a comparison into a mask register and a
        // `vpmovm2b`, the very instructions this kernel avoids.
        let dots = s
            .avx512f
            ._mm256_ternarylogic_epi32::<{ 0xF0 & 0xCC & 0xAA }>(lf_first, dot, splat(0x80));
        s.avx512f
            ._mm256_ternarylogic_epi32::<{ (0xF0 ^ 0xCC) | 0xAA }>(cr, lf, dots)
    }

    /// The lanes of the 64 pairs from `w[0]`.
    #[inline(always)]
    fn block(self, w: &[u8; PAIRS + 1]) -> VlLanes {
        match (w.first_chunk(), w.last_chunk()) {
            (Some(lo), Some(hi)) => [self.half(lo), self.half(hi)],
            _ => unreachable!("two overlapping halves of a block"),
        }
    }

    #[inline(always)]
    fn clean(self, l: &VlLanes) -> bool {
        let s = self.simd;
        let any = s.avx2._mm256_or_si256(l[0], l[1]);
        s.avx._mm256_testz_si256(any, any) != 0
    }

    /// The marked lanes (bare or dot) as a bit mask, lane `k` in bit `k`.
    #[inline(always)]
    fn marks(self, l: &VlLanes) -> u64 {
        let s = self.simd;
        let lo = s.avx2._mm256_movemask_epi8(l[0]) as u32 as u64;
        let hi = s.avx2._mm256_movemask_epi8(l[1]) as u32 as u64;
        lo | hi << 32
    }

    /// True when some lane of the block is bare (a dot lane has only its top bit).
    #[inline(always)]
    fn has_bare(self, l: &VlLanes) -> bool {
        let s = self.simd;
        let any = s.avx2._mm256_or_si256(l[0], l[1]);
        s.avx._mm256_testz_si256(any, s.avx._mm256_set1_epi8(0x7F)) == 0
    }

    /// The (bare, dot) lanes as bit masks, lane `k` in bit `k`.
    #[inline(always)]
    fn bits(self, l: &VlLanes) -> (u64, u64) {
        let marks = self.marks(l);
        if !self.has_bare(l) {
            return (0, marks);
        }
        // Doubled, a bare lane keeps its top bit (0xFE) and a dot lane loses it.
        let s = self.simd;
        let twice = |v| s.avx2._mm256_add_epi8(v, v);
        let bare = self.marks(&[twice(l[0]), twice(l[1])]);
        (bare, marks & !bare)
    }

    /// A marked block of the pairs `base..base + 64`, those below `base + skip` already judged.
    /// Without a bare lane in the block or before it, every LF of a dot lane follows a CR
    /// (the pair that ends at it is the lane before, or was judged clean before this block), so
    /// each dot starts a line and goes to `line_dots`; otherwise `Marks::walk` asks the input.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        l: &VlLanes,
        base: usize,
        skip: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        let keep = u64::MAX << skip;
        let (bare, dot) = self.bits(l);
        self.walk_bits(
            s,
            input,
            start,
            base,
            bare & keep,
            dot & keep,
            body_from,
            sink,
        )
    }

    /// `walk` with the block's lanes as bit masks.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk_bits(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        base: usize,
        bare: u64,
        dot: u64,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        if bare == 0 && !s.bare {
            let dots = u128::from(dot);
            return Marks::line_dots(self.roomy, s, input, base, dots, body_from, sink);
        }
        Marks::walk(s, input, start, base, dot, bare, None, body_from, sink)
    }

    /// The whole blocks of `rest` (from the first pair to judge) while there are two, with a
    /// test and branch for each block, as `Vector::each_block` does for the `Avx512` kernel,
    /// with its fast path for stuffed dots: while the body is roomy and has no bare CR or LF, a
    /// marked block without a bare lane has only dots that start a line (see `walk`), dropped
    /// by `Marks::stuffed` with the length and the start of the pending bytes in registers.
    /// Returns the bytes left, less than two whole blocks. Testing each pair of blocks instead
    /// (as the `Avx2` kernel does; three ways of walking a marked pair were tried) was 1-4%
    /// faster on plain bodies and 7-17% slower on dotted ones (paired harness, Zen 4,
    /// 2026-12-07, BENCHMARKS.md).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn each_block<'a>(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        hay: &[u8],
        mut rest: &'a [u8],
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>, &'a [u8]> {
        let mut quick = self.roomy && !s.bare;
        let (mut from, mut len) = (*body_from, s.len);
        let last = input.len().saturating_sub(3);
        loop {
            let marked = loop {
                let Some(w) = rest.first_chunk::<{ 2 * PAIRS + 1 }>() else {
                    break None;
                };
                let (w0, w1) = match (w.first_chunk(), w.last_chunk()) {
                    (Some(l), Some(m)) => (l, m),
                    _ => unreachable!("two overlapping blocks of a double one"),
                };
                let l = self.block(w0);
                if !self.clean(&l) {
                    break Some(l);
                }
                let m = self.block(w1);
                if !self.clean(&m) {
                    rest = &rest[PAIRS..];
                    break Some(m);
                }
                rest = &rest[2 * PAIRS..];
            };
            let Some(l) = marked else {
                (*body_from, s.len) = (from, len);
                return ControlFlow::Continue(rest);
            };
            let j = hay.len() - rest.len();
            let (bare, mut dot) = self.bits(&l);
            if quick && bare == 0 {
                dot = Marks::stuffed(input, dot, j + 1, last, &mut from, &mut len, sink);
                if dot == 0 {
                    rest = &rest[PAIRS..];
                    continue;
                }
            }
            (*body_from, s.len) = (from, len);
            self.walk_bits(s, input, start, j, bare, dot, body_from, sink)
                .map_continue(|()| rest)?;
            (from, len) = (*body_from, s.len);
            quick = quick && !s.bare;
            rest = &rest[PAIRS..];
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Kernel for Avx512Vl {
    #[inline(always)]
    fn pairs(
        self,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        from: usize,
        to: usize,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        // Only the bytes of the pairs `..to`, so that a block's bounds check is the loop's test.
        let hay = &input[..=to];
        if to <= PAIRS {
            // A short input: one block over a copy padded with NULs, as in `Vector::pairs`.
            let mut pad = [0u8; PAIRS + 1];
            pad[..=to - from].copy_from_slice(&hay[from..]);
            let (bare, dot) = self.bits(&self.block(&pad));
            let keep = u64::MAX >> (PAIRS - (to - from));
            let (bare, dot) = (bare & keep, dot & keep);
            return Marks::walk(s, input, start, from, dot, bare, None, body_from, sink);
        }
        // Whole blocks: the pairs `j..j + 64` read `input[j..j + 65]`.
        let rest = self.each_block(s, input, start, hay, &hay[from..], body_from, sink)?;
        let mut rest = rest;
        if let Some(w) = rest.first_chunk::<{ PAIRS + 1 }>() {
            let l = self.block(w);
            if !self.clean(&l) {
                let j = hay.len() - rest.len();
                self.walk(s, input, start, &l, j, 0, body_from, sink)?;
            }
            rest = &rest[PAIRS..];
        }
        // The last, partial block: the one that ends with the pair `to - 1`, overlapping pairs
        // already judged, which are masked off. Every pair up to `to - 1` is then judged.
        let j = hay.len() - rest.len();
        if j < to {
            let base = to - PAIRS;
            let l = self.block(window(hay, base));
            if !self.clean(&l) {
                self.walk(s, input, start, &l, base, j - base, body_from, sink)?;
            }
        }
        ControlFlow::Continue(())
    }
}

/// The walk over the marks of vector blocks, as bit masks (bit `k` for the `k`-th pair of a
/// block), which the AVX2 and AVX-512 kernels share.
#[cfg(target_arch = "x86_64")]
struct Marks;

#[cfg(target_arch = "x86_64")]
impl Marks {
    /// Walks a marked block in order: `dot_bits` and `bare_bits` have bit `k` for the pair
    /// `base + k`, only for the pairs the caller judges here; each LF-dot goes to `dot_line`
    /// once `s.bare` is up to date with the pairs before it. With `lf_bare` (bit `k`: the LF of
    /// pair `base + k` is bare), the lanes have already told whether the dot starts a line.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn walk(
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        base: usize,
        mut dot_bits: u64,
        mut bare_bits: u64,
        lf_bare: Option<u64>,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        while dot_bits != 0 {
            let p = dot_bits.trailing_zeros();
            // The pairs before this one; the LF-dot pair itself is never bare.
            let below = (1u64 << p) - 1;
            if bare_bits & below != 0 {
                s.bare = true;
            }
            let lf = base + p as usize;
            match lf_bare {
                // A bare LF: the dot does not start a line; it is content.
                Some(b) if b >> p & 1 != 0 => {}
                Some(_) => s.line_dot(input, lf + 1, body_from, sink)?,
                None => s.dot_line(input, start, lf, body_from, sink)?,
            }
            // Go on with the pair after the LF-dot.
            dot_bits &= dot_bits - 1;
            bare_bits &= !below;
        }
        if bare_bits != 0 {
            s.bare = true;
        }
        ControlFlow::Continue(())
    }

    /// Dots that all start a line (two marked blocks with no bare lane): bit `k` of `dots` is the
    /// dot at `base + k + 1`. Nearly all are stuffed dots, which need only their segment handed
    /// out. While the body cannot outgrow its limit in this input (`roomy`) and is
    /// not rejected, they are dropped by `stuffed`, with the length and the start of the
    /// pending bytes in registers, one block's word after the other (whose bit steps cost a
    /// third of the 128-bit word's). The first other dot (maybe the end marker) and all after it
    /// go to `line_dot`, walked as one 128-bit word.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn line_dots(
        roomy: bool,
        s: &mut DataScanner,
        input: &[u8],
        base: usize,
        mut dots: u128,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        if roomy && !s.bare {
            // Local copies, so that the loops keep them in registers.
            let (mut from, mut len) = (*body_from, s.len);
            // The last dot with two bytes after it, as `line_dot` wants.
            let last = input.len().saturating_sub(3);
            // The two words one after the other, written out: as a loop over an array of
            // `(&mut u64, usize)` LLVM turned the AVX2 kernel's masks into byte-by-byte
            // `vpextrb`/`vpinsrb` shuffles, and dot-stuffed bodies scanned 10x slower (2 GiB/s
            // on 100 KB, the AVX-512 kernel unaffected).
            let (mut lo, mut hi) = (dots as u64, (dots >> 64) as u64);
            lo = Marks::stuffed(input, lo, base + 1, last, &mut from, &mut len, sink);
            if lo == 0 {
                hi = Marks::stuffed(input, hi, base + 1 + PAIRS, last, &mut from, &mut len, sink);
            }
            dots = u128::from(lo) | u128::from(hi) << 64;
            (*body_from, s.len) = (from, len);
        }
        while dots != 0 {
            let dot = base + dots.trailing_zeros() as usize + 1;
            s.line_dot(input, dot, body_from, sink)?;
            dots &= dots - 1;
        }
        ControlFlow::Continue(())
    }

    /// The fast loop of `line_dots`: bit `k` of `word` is a dot that starts a line at `at + k`;
    /// drops them in order, each one's segment handed out and counted in `len` without `emit`'s
    /// tests (the caller knows the body is roomy and not rejected), up to the first whose next
    /// byte is a CR (maybe the end marker) or that lies past `last` (the last dot with two bytes
    /// after it, as `line_dot` wants, so the two agree). Returns the bits of the dots left.
    #[inline(always)]
    fn stuffed(
        input: &[u8],
        mut word: u64,
        at: usize,
        last: usize,
        from: &mut usize,
        len: &mut u64,
        sink: &mut impl FnMut(&[u8]),
    ) -> u64 {
        while word != 0 {
            let dot = at + word.trailing_zeros() as usize;
            if dot > last || input[dot + 1] == b'\r' {
                break;
            }
            // Never empty: `from` is at most the LF before the dot.
            debug_assert!(*from < dot);
            sink(&input[*from..dot]);
            *len += (dot - *from) as u64;
            *from = dot + 1;
            word &= word - 1;
        }
        word
    }

    /// A marked block whose lanes are shifted (see `Blocks::shifted`), as bit masks of the
    /// positions `base..base + 64` the caller judges here: bit 0 of `bare_lanes` is the pair
    /// `base - 1`, before all of the block's pairs; bit `k` of `dot_bits` the pair `base + k`.
    /// `roomy` as for `line_dots`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn shifted(
        roomy: bool,
        s: &mut DataScanner,
        input: &[u8],
        start: usize,
        base: usize,
        bare_lanes: u64,
        dot_bits: u64,
        body_from: &mut usize,
        sink: &mut impl FnMut(&[u8]),
    ) -> ControlFlow<Result<usize, usize>> {
        if bare_lanes == 0 {
            // As in `Vector::walk_two`: without a bare lane, each dot starts a line.
            let dots = u128::from(dot_bits);
            return Marks::line_dots(roomy, s, input, base, dots, body_from, sink);
        }
        if bare_lanes & 1 != 0 {
            s.bare = true;
        }
        Marks::walk(
            s,
            input,
            start,
            base,
            dot_bits,
            bare_lanes >> 1,
            // Bare lane `k` is the pair that ends at the LF of dot lane `k`.
            Some(bare_lanes),
            body_from,
            sink,
        )
    }
}

/// True when some byte pair of `seg` breaks "CR if and only if LF follows": a CR followed by
/// something else, or an LF preceded by something else. A CR as the very last byte is not judged
/// (its LF may come in the next read). Written as fixed-width chunks of plain comparisons so that
/// the compiler vectorizes it; the early exit is per chunk.
fn has_bare_cr_lf(seg: &[u8]) -> bool {
    const W: usize = 64;
    if seg.len() < 2 {
        return false;
    }
    let (a, b) = (&seg[..seg.len() - 1], &seg[1..]);
    if a.len() < W {
        return a.iter().zip(b).any(|(&x, &y)| (x == b'\r') != (y == b'\n'));
    }
    let window = |at: usize| {
        // Fixed-size views let the compiler drop the bounds checks and vectorize.
        let (Ok(x), Ok(y)) = (
            <&[u8; W]>::try_from(&a[at..at + W]),
            <&[u8; W]>::try_from(&b[at..at + W]),
        ) else {
            return true;
        };
        let mut acc = 0u8;
        for k in 0..W {
            acc |= u8::from(x[k] == b'\r') ^ u8::from(y[k] == b'\n');
        }
        acc != 0
    };
    // Whole windows, then one last window overlapping the previous one instead of a slow tail.
    (0..a.len() / W).any(|c| window(c * W)) || window(a.len() - W)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow oracle: the first `<CRLF>.<CRLF>` with the 354 counting as a CRLF, then split on
    /// CRLF and drop one leading dot per line. Returns (consumed, body, bare).
    pub(crate) fn naive(input: &[u8]) -> Option<(usize, Vec<u8>, bool)> {
        let mut pre = b"\r\n".to_vec();
        pre.extend_from_slice(input);
        let k = pre.windows(5).position(|w| w == b"\r\n.\r\n")?;
        let raw = &input[..k];
        let mut body = Vec::new();
        let mut rest = raw;
        while !rest.is_empty() {
            let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
                Some(p) => (&rest[..p + 2], &rest[p + 2..]),
                None => (rest, &rest[rest.len()..]),
            };
            body.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            rest = next;
        }
        let bare = (0..raw.len()).any(|i| {
            (raw[i] == b'\r' && raw.get(i + 1) != Some(&b'\n'))
                || (raw[i] == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
        });
        Some((k + 3, body, bare))
    }

    /// Feeds `input` in the given chunks, collecting the segments into a body as the session
    /// does (and dropping it once the message is rejected); returns (consumed, body, bare) like
    /// `naive`. Runs every kernel this CPU has (AVX-512, AVX2, portable), which must agree on
    /// everything, the segments handed out included.
    fn chunked(input: &[u8], cuts: &[usize]) -> Option<(usize, Vec<u8>, bool)> {
        let portable = chunked_with(input, cuts, portable_scanner(u64::MAX));
        for simd in kernels() {
            let other = chunked_with(input, cuts, DataScanner::with_simd(simd, u64::MAX));
            assert_eq!(
                other,
                portable,
                "kernels {simd:?} and portable differ, cuts {cuts:?}: {:?}",
                String::from_utf8_lossy(input)
            );
        }
        portable
    }

    /// Every vector kernel this CPU can run (the portable one aside).
    fn kernels() -> Vec<Simd> {
        let mut all = Simd::all();
        all.pop();
        all
    }

    /// A scanner that uses the portable kernel whatever the CPU.
    fn portable_scanner(max: u64) -> DataScanner {
        DataScanner::with_simd(Simd::Portable, max)
    }

    #[test]
    fn the_best_kernel_this_cpu_has_is_picked() {
        // On x86-64 the scanner must run the widest vector kernel the CPU has at full speed (a
        // regression to the portable one would pass every other test and lose most of it).
        #[cfg(target_arch = "x86_64")]
        {
            // On Zen 4 the AVX-512 kernel on 256-bit vectors (see `Avx512Vl`).
            let picked = DataScanner::new(0).simd;
            let want = match avx512_token() {
                Some(_) if zen4() => "Avx512Vl",
                Some(_) => "Avx512",
                None if pulp::x86::V3::try_new().is_some() => "Avx2",
                None => "Portable",
            };
            let variant = format!("{picked:?}");
            assert_eq!(variant.split('(').next(), Some(want), "{picked:?}");
        }
    }

    #[test]
    fn each_kernel_the_cpu_runs_can_be_named_and_scans_alike() {
        let names = DataScanner::kernels();
        assert_eq!(names.last(), Some(&"portable"));
        assert!(names.contains(&DataScanner::new(0).kernel()));
        assert!(DataScanner::with_kernel(0, "sse9").is_none());
        let input = b"..a\r\nb\r\n..c\r\n.\r\nafter";
        for name in names {
            let mut s = DataScanner::with_kernel(u64::MAX, name).unwrap();
            assert_eq!(s.kernel(), name);
            let mut body = Vec::new();
            let end = s.scan(input, |seg| body.extend_from_slice(seg));
            assert_eq!(end, Some(input.len() - 5), "{name}");
            assert_eq!(body, b".a\r\nb\r\n.c\r\n", "{name}");
        }
    }

    fn chunked_with(
        input: &[u8],
        cuts: &[usize],
        mut s: DataScanner,
    ) -> Option<(usize, Vec<u8>, bool)> {
        let mut body = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            let r = s.scan(&input[from..to], |seg| body.extend_from_slice(seg));
            if !s.rejecting() {
                assert_eq!(s.len(), body.len() as u64, "len counts what was handed out");
            }
            if let Some(c) = r {
                return Some((from + c, body, s.bare_cr_lf()));
            }
            from = to;
        }
        None
    }

    fn check(input: &[u8]) {
        let want = naive(input);
        let norm = |r: Option<(usize, Vec<u8>, bool)>| {
            r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
        };
        let want = norm(want);
        assert_eq!(
            norm(chunked(input, &[])),
            want,
            "whole: {:?}",
            String::from_utf8_lossy(input)
        );
        for cut in 0..=input.len() {
            assert_eq!(
                norm(chunked(input, &[cut])),
                want,
                "cut {cut}: {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            norm(chunked(input, &bytewise)),
            want,
            "bytewise: {:?}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn plain_message() {
        let r = chunked(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n", &[]).unwrap();
        assert_eq!(r, (24, b"Subject: hi\r\n\r\nbody\r\n".to_vec(), false));
    }

    #[test]
    fn empty_message_right_after_354() {
        assert_eq!(chunked(b".\r\n", &[]), Some((3, vec![], false)));
    }

    #[test]
    fn dot_unstuffing() {
        let r = chunked(b"..leading\r\n...two\r\n.\r\n", &[]).unwrap();
        assert_eq!(r.1, b".leading\r\n..two\r\n");
        // A dot inside a line is content.
        assert_eq!(chunked(b"a.b\r\n.\r\n", &[]).unwrap().1, b"a.b\r\n");
    }

    #[test]
    fn smuggling_vectors_never_end_the_data_and_are_flagged() {
        // smtp-proto's vectors: each must not end the data; the real end comes after.
        for v in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n.\r",
            b"\r.\n",
            b"\r\n.\r\r\n",
            b"\r\r\n.\n\r\n",
        ] {
            let mut msg = b"Subject: a\r\n\r\nfirst".to_vec();
            msg.extend_from_slice(v);
            let real_end_of_smuggled = msg.len();
            msg.extend_from_slice(b"MAIL FROM:<evil@x>\r\nsecond\r\n.\r\n");
            let (consumed, _, bare) = chunked(&msg, &[]).unwrap();
            assert!(
                consumed > real_end_of_smuggled,
                "{v:?} ended the data early"
            );
            assert_eq!(consumed, msg.len(), "{v:?}");
            assert!(bare, "{v:?} not flagged as bare CR/LF");
            check(&msg);
        }
    }

    #[test]
    fn clean_crlf_is_not_bare() {
        let (_, _, bare) = chunked(b"a\r\nb\r\n\r\n.\r\n", &[]).unwrap();
        assert!(!bare);
    }

    #[test]
    fn chunked_equals_whole_on_tricky_inputs() {
        for input in [
            &b"x\r\n.\r\n"[..],
            b".\r\n",
            b"..\r\n.\r\n",
            b".\r\r\n.\r\n",
            b".\rx\r\n.\r\n",
            b"\r\r\n.\r\n",
            b"a\r\n.a\r\n..\r\n.\r\n",
            b"a\r\n.\r\n",
            b"\r\n.\r\n",
            b"\n\r\n.\r\n",
            b"a\r",
            b"a\r\n.",
            b"a\r\n.\r",
            b"a\n.\r\n.\r\n",
            b"a\r\n\n.\r\n",
            b"a\r\n\r.\r\n",
            b"a\r\n.\r.\r\n",
        ] {
            check(input);
        }
    }

    #[test]
    fn pseudo_random_inputs_match_the_oracle() {
        // A small xorshift generator over an alphabet dense in CR, LF and dots.
        let alphabet = b"\r\n.\r\n.a";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 14) as usize;
            let mut v = Vec::with_capacity(len + 5);
            let mut y = x;
            for _ in 0..len {
                v.push(alphabet[(y % alphabet.len() as u64) as usize]);
                y /= 7;
            }
            v.extend_from_slice(b"\r\n.\r\n");
            check(&v);
        }
    }

    #[test]
    fn long_sparse_inputs_match_the_oracle() {
        // Long enough to cross the 64-byte chunks of the bare CR/LF check, with CR, LF and dots
        // placed rarely and anywhere.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for round in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 60 + (x % 240) as usize;
            let mut v = Vec::with_capacity(len + 5);
            let mut y = x;
            for _ in 0..len {
                y = y
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                v.push(match (y >> 33) % 40 {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'.',
                    _ => b'a',
                });
            }
            // Every other input is made of well-formed lines (some dot-started), so that the
            // clean path is covered as well as the bare one.
            if round % 2 == 0 {
                v.retain(|&b| b != b'\r' && b != b'\n');
                for k in (0..v.len()).step_by(37) {
                    v[k] = b'.';
                }
                let lines: Vec<&[u8]> = v.chunks(29).collect();
                v = lines.join(&b"\r\n"[..]);
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"\r\n.\r\n");
            check(&v);
        }
    }

    #[test]
    fn long_bodies_across_stretches_match_the_oracle() {
        // Bodies longer than the 8 KiB stretch, with line lengths that put LFs, dots and bare
        // bytes on and around the stretch boundaries; fed whole and split at many offsets.
        let mut x: u64 = 0xD1B5_4A32_D192_ED03;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..40 {
            let mut v = Vec::new();
            while v.len() < 20_000 + (round * 997) {
                let r = next();
                if r % 5 == 0 {
                    v.push(b'.');
                }
                let len = (r >> 8) as usize % 300;
                v.extend(std::iter::repeat_n(b'w', len));
                v.extend_from_slice(b"\r\n");
            }
            if round % 3 == 1 {
                let at = next() as usize % v.len();
                v[at] = if round % 2 == 0 { b'\r' } else { b'\n' };
            }
            // A dot line right on a stretch boundary.
            let mut tail_dot = b"\r\n..x\r\n".to_vec();
            let at = 8192 - 2 + round % 5;
            if at + tail_dot.len() < v.len() {
                v.splice(at..at + tail_dot.len(), tail_dot.drain(..));
            }
            v.extend_from_slice(b"\r\n.\r\nNOOP\n");
            let want = naive(&v);
            let norm = |r: Option<(usize, Vec<u8>, bool)>| {
                r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
            };
            let want = norm(want);
            assert_eq!(norm(chunked(&v, &[])), want, "round {round} whole");
            let mut cuts: Vec<usize> = (0..30).map(|_| next() as usize % v.len()).collect();
            cuts.extend(
                [8191, 8192, 8193, 16384, 16385]
                    .iter()
                    .filter(|&&c| c < v.len()),
            );
            for cut in cuts {
                assert_eq!(norm(chunked(&v, &[cut])), want, "round {round} cut {cut}");
            }
            let many: Vec<usize> = (1..v.len()).step_by(4093).collect();
            assert_eq!(norm(chunked(&v, &many)), want, "round {round} many cuts");
        }
    }

    #[test]
    fn dot_lines_and_bare_bytes_at_every_offset_match_the_oracle() {
        // A dot line, the end marker or a bare byte at every offset of a short input, so that
        // each lands at the start, middle and end of the input and of every split (`check`
        // feeds it whole and split at every offset).
        for v in [
            &b"\r\n..x\r\n"[..],
            b"\r\n.\r\n",
            b"\n",
            b"\r",
            b"\r\n.\n",
            b"\n.\r\n",
        ] {
            for pos in 0..=150 - v.len() {
                let mut input = vec![b'a'; 150];
                input[pos..pos + v.len()].copy_from_slice(v);
                input.extend_from_slice(b"\r\n.\r\nNOOP\n");
                check(&input);
            }
        }
    }

    /// The patterns the kernels must get right wherever they fall: a stuffed dot line, the end
    /// marker, bare bytes alone, and bare bytes around a line-start dot.
    const PATTERNS: [&[u8]; 9] = [
        b"\r\n..x\r\n",
        b"\r\n.\r\n",
        b"\n",
        b"\r",
        b"\r\n.\n",
        b"\n.\r\n",
        b"\r\r\n",
        b"\r\n.\r\r\n",
        b"\r\n..\r\n.\r\n",
    ];

    #[test]
    fn patterns_at_every_offset_of_the_vector_blocks_match_the_oracle() {
        // Clean CRLF lines (some dot-started) long enough for two whole 64-pair blocks and a
        // partial one, with each pattern at every offset, so that it lands on every lane of a
        // block, across two blocks and in the last, overlapping block; `check` also splits the
        // input at every offset, which makes inputs shorter than one block (the padded copy).
        let mut line = Vec::new();
        for k in 0..5 {
            line.extend(std::iter::repeat_n(b'a', 7 + 5 * k));
            line.extend_from_slice(if k % 2 == 0 { b"\r\n." } else { b"\r\n" });
        }
        for v in PATTERNS {
            for pos in 0..=170 - v.len() {
                let mut input: Vec<u8> = line.iter().copied().cycle().take(170).collect();
                input[pos..pos + v.len()].copy_from_slice(v);
                input.extend_from_slice(b"\r\n.\r\nNOOP\n");
                check(&input);
            }
        }
    }

    #[test]
    fn patterns_at_every_offset_of_two_block_steps_match_the_oracle() {
        // The vector kernels test two blocks at a time and walks the dots of a marked pair in one
        // go when it has no bare lane: clean CRLF lines with a dot line every few dozen bytes
        // (so a pair holds several, on both sides of its middle), long enough for two such
        // steps after the first block, with each pattern at every offset; fed whole and split
        // around the pattern and the block boundaries.
        let mut line = Vec::new();
        for k in 0..5 {
            line.extend(std::iter::repeat_n(b'a', 7 + 5 * k));
            line.extend_from_slice(if k % 2 == 0 { b"\r\n." } else { b"\r\n" });
        }
        let norm = |r: Option<(usize, Vec<u8>, bool)>| {
            r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
        };
        for v in PATTERNS {
            for pos in 0..=330 - v.len() {
                let mut input: Vec<u8> = line.iter().copied().cycle().take(330).collect();
                input[pos..pos + v.len()].copy_from_slice(v);
                input.extend_from_slice(b"\r\n.\r\nNOOP\n");
                let want = norm(naive(&input));
                assert_eq!(norm(chunked(&input, &[])), want, "pos {pos} {v:?} whole");
                for cut in [pos, pos + 1, pos + v.len(), 63, 64, 65, 192, 193, 320] {
                    assert_eq!(
                        norm(chunked(&input, &[cut])),
                        want,
                        "pos {pos} {v:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn patterns_around_stretch_boundaries_match_the_oracle() {
        // Each pattern at every offset within a block's reach of the first stretch boundary (and
        // at a few near the second), fed whole and split around the pattern and the boundary.
        let mut base = Vec::new();
        while base.len() < 2 * STRETCH + 300 {
            base.extend(std::iter::repeat_n(b'w', 40 + base.len() % 31));
            base.extend_from_slice(b"\r\n");
        }
        let at = (STRETCH - 70..STRETCH + 70).chain(2 * STRETCH - 3..2 * STRETCH + 3);
        for v in PATTERNS {
            for pos in at.clone() {
                let mut input = base.clone();
                input[pos..pos + v.len()].copy_from_slice(v);
                input.extend_from_slice(b"\r\n.\r\nNOOP\n");
                let norm = |r: Option<(usize, Vec<u8>, bool)>| {
                    r.map(|(c, b, bare)| (c, if bare { Vec::new() } else { b }, bare))
                };
                let want = norm(naive(&input));
                assert_eq!(norm(chunked(&input, &[])), want, "pos {pos} {v:?} whole");
                for cut in [pos, pos + 1, pos + v.len(), STRETCH, STRETCH + 1, pos - 64] {
                    assert_eq!(
                        norm(chunked(&input, &[cut])),
                        want,
                        "pos {pos} {v:?} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_after_the_end_do_not_taint_the_message() {
        // Commands after the end marker may end in bare LF; they are not part of the message,
        // whichever way the chunks of the fast path fall.
        for pad in 0..140 {
            let mut v = vec![b'a'; pad];
            v.extend_from_slice(b"\r\n.\r\n");
            let end = v.len();
            for _ in 0..10 {
                v.extend_from_slice(b"NOOP\n\r.\n");
            }
            let (consumed, body, bare) = chunked(&v, &[]).unwrap();
            assert_eq!((consumed, bare), (end, false), "pad {pad}");
            assert_eq!(body.len(), pad + 2);
            check(&v);
        }
    }

    #[test]
    fn bare_check_matches_naive_across_chunks() {
        for len in 0..200 {
            for pos in 0..len {
                for b in [b'\r', b'\n'] {
                    let mut v = vec![b'a'; len];
                    v[pos] = b;
                    let naive =
                        (0..len.saturating_sub(1)).any(|i| (v[i] == b'\r') != (v[i + 1] == b'\n'));
                    assert_eq!(has_bare_cr_lf(&v), naive, "len {len} pos {pos} byte {b}");
                }
            }
        }
    }

    #[test]
    fn oversize_is_flagged_and_nothing_more_is_handed_out() {
        let mut s = DataScanner::new(10);
        let mut body = Vec::new();
        assert_eq!(
            s.scan(b"0123456789", |seg| body.extend_from_slice(seg)),
            None
        );
        assert!(!s.too_big());
        assert_eq!(body.len(), 10);
        assert_eq!(s.scan(b"abc\r\n", |seg| body.extend_from_slice(seg)), None);
        assert!(s.too_big() && s.rejecting());
        // The segment that crossed the limit was not handed out, and nothing after it is.
        assert_eq!(body.len(), 10);
        for _ in 0..100 {
            assert_eq!(s.scan(&[b'z'; 1000], |_| panic!("handed out")), None);
        }
        assert_eq!(s.scan(b"\r\n.\r\nNEXT", |_| panic!("handed out")), Some(5));
        assert_eq!(s.len(), 15 + 100_000 + 2);
    }

    /// The segments a scanner hands out for `input` fed whole, its answer and its length.
    fn segments(input: &[u8], mut s: DataScanner) -> (Vec<Vec<u8>>, Option<usize>, u64, bool) {
        let mut segs = Vec::new();
        let end = s.scan(input, |seg| segs.push(seg.to_vec()));
        (segs, end, s.len(), s.too_big())
    }

    #[test]
    fn size_limit_inside_a_run_of_dot_lines_matches_the_portable_kernel() {
        // Dot lines every few dozen bytes, well-formed, so that the vector kernels drop their
        // dots in their fast loop, which hands out without `emit`'s tests as long as the body
        // cannot cross the limit in the blocks at hand. With every limit around the body's
        // length (so that it is crossed in every block, at and around every dot), every kernel
        // must hand out exactly the same segments, stop at the same one, and count the same.
        let mut input = Vec::new();
        let mut k = 0;
        while input.len() < 600 {
            input.extend_from_slice(if k % 2 == 0 { b".." } else { b"." });
            input.extend(std::iter::repeat_n(b'a', 5 + k % 23));
            input.extend_from_slice(b"\r\n");
            k += 1;
        }
        input.extend_from_slice(b".\r\nNOOP\r\n");
        let (all, end, len, _) = segments(&input, portable_scanner(u64::MAX));
        assert!(all.len() > 30, "a segment per dot line");
        for max in 0..len + 3 {
            let portable = segments(&input, portable_scanner(max));
            for simd in kernels() {
                let picked = segments(&input, DataScanner::with_simd(simd, max));
                assert_eq!(picked, portable, "max {max}, {simd:?}");
            }
            assert_eq!(
                (portable.1, portable.2, portable.3),
                (end, len, len > max),
                "max {max}"
            );
            let kept: u64 = portable.0.iter().map(|seg| seg.len() as u64).sum();
            assert!(kept <= max, "max {max}: {kept} bytes handed out");
        }
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut s = DataScanner::new(5);
        let mut body = Vec::new();
        assert_eq!(
            s.scan(b"abc\r\n.\r\n", |seg| body.extend_from_slice(seg)),
            Some(8)
        );
        assert!(!s.too_big());
        assert_eq!(body, b"abc\r\n");
    }
}
