//! Calls into a stopped process, as a debugger does: every thread seized and interrupted
//! ([`Stopped`]), one of them given a call frame (registers, a return address of 0 and the
//! arguments) and resumed until the call returns into the fault at 0, then put back exactly
//! as it was: its general and vector registers, and the system call it was in, which the
//! kernel restarts (or fails with EINTR where the program asked for that) as after any stop.
//! Signals that arrive meanwhile are held and delivered when the threads are let go.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

/// Why a remote step failed: said to the user as one line.
pub type Failure = String;

/// How a failure to seize a process another tracer holds begins (tried again: another
/// injection ends in milliseconds).
pub const TRACED: &str = "it is being traced already";

/// A thread's saved state: general registers and the extended (x87/SSE/AVX) area.
struct Saved {
    regs: libc::user_regs_struct,
    xstate: Vec<u8>,
}

/// Every thread of a process, stopped.
pub struct Stopped {
    pid: i32,
    tids: Vec<i32>,
    /// Signals that stopped a thread (or arrived during a call) instead of the interrupt:
    /// delivered when it is let go.
    pending: HashMap<i32, Vec<i32>>,
    pub since: Instant,
}

/// System calls a thread must not be in while it runs `dlopen`: the allocator's (it may hold
/// an arena lock there) and those of a process being forked or replaced.
const UNSAFE_SYSCALLS: [i64; 13] = [9, 10, 11, 12, 25, 28, 56, 57, 58, 59, 60, 231, 435];
/// fork, vfork, clone, clone3, execve, execveat.
const FORK_EXEC: [i64; 6] = [56, 57, 58, 59, 322, 435];
const NT_X86_XSTATE: libc::c_int = 0x202;
const PTRACE_EVENT_STOP: i32 = 128;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn ptrace(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> Result<i64, std::io::Error> {
    // SAFETY: the request's arguments are plain values or point to buffers the caller owns.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(errno());
    }
    Ok(r)
}

/// Waits for `tid` to stop (or die): its wait status; `None` after `timeout`.
fn wait(tid: i32, timeout: Duration) -> Result<Option<i32>, Failure> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: an out-parameter.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r == tid {
            return Ok(Some(status));
        }
        if r == -1 {
            return Err(format!("waiting for thread {tid}: {}", errno()));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl Stopped {
    /// Seizes and interrupts every thread of `pid`, also those started meanwhile.
    pub fn seize(pid: i32) -> Result<Stopped, Failure> {
        let mut s = Stopped {
            pid,
            tids: Vec::new(),
            pending: HashMap::new(),
            since: Instant::now(),
        };
        loop {
            let listed = super::super::threads(pid as u32);
            let new: Vec<i32> = listed
                .iter()
                .map(|&t| t as i32)
                .filter(|t| !s.tids.contains(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                match ptrace(libc::PTRACE_SEIZE, tid, 0, 0) {
                    Ok(_) => {}
                    // Exited since it was listed.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(e) => {
                        s.release();
                        return Err(match e.raw_os_error() {
                            // Another tracer came between the check and the seize.
                            Some(libc::EPERM) if tracer_of(pid) != 0 => {
                                format!("{TRACED} by pid {} (another injection?)", tracer_of(pid))
                            }
                            Some(libc::EPERM) => format!(
                                "ptrace is not permitted on it ({e}: kernel.yama.ptrace_scope, \
                                 a missing CAP_SYS_PTRACE, or another tracer)"
                            ),
                            _ => format!("ptrace seize of thread {tid}: {e}"),
                        });
                    }
                }
                s.tids.push(tid);
                if ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).is_err() {
                    continue;
                }
                s.stopped(tid)?;
            }
        }
        if s.tids.is_empty() {
            return Err("it has no threads left".into());
        }
        Ok(s)
    }

    /// Waits for the interrupt of `tid` to stop it; a signal that stopped it first is held.
    fn stopped(&mut self, tid: i32) -> Result<(), Failure> {
        loop {
            let Some(status) = wait(tid, Duration::from_secs(2))? else {
                return Err(format!(
                    "thread {tid} did not stop within 2 s (in a vfork waiting for its child, or \
                     an uninterruptible wait)"
                ));
            };
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.tids.retain(|&t| t != tid);
                return Ok(());
            }
            if status >> 16 == PTRACE_EVENT_STOP {
                return Ok(());
            }
            // A signal-delivery stop: held, and the thread let on to the interrupt.
            self.pending
                .entry(tid)
                .or_default()
                .push(libc::WSTOPSIG(status));
            ptrace(libc::PTRACE_CONT, tid, 0, 0)
                .map_err(|e| format!("resuming thread {tid}: {e}"))?;
        }
    }

    /// The thread to make the calls in: the main thread or another, one that is not inside
    /// the allocator or the dynamic loader (`risky`: the address ranges of their code), nor
    /// in one of their system calls. `Err` with the reason when none is.
    pub fn choose(&self, risky: &[(u64, u64)]) -> Result<i32, Failure> {
        let mut why = String::new();
        let mut order = self.tids.clone();
        order.sort_by_key(|&t| t != self.pid);
        for tid in order {
            let Ok(regs) = get_regs(tid) else { continue };
            let nr = regs.orig_rax as i64;
            if FORK_EXEC.contains(&nr) {
                why = format!("thread {tid} is in the middle of fork or exec");
                continue;
            }
            if UNSAFE_SYSCALLS.contains(&nr) {
                why = format!("thread {tid} is in the allocator's system call {nr}");
                continue;
            }
            if nr < 0 && risky.iter().any(|&(s, e)| regs.rip >= s && regs.rip < e) {
                why = format!("thread {tid} is running inside the allocator or the loader");
                continue;
            }
            return Ok(tid);
        }
        Err(why)
    }

    /// Calls `func(args...)` on `tid` and returns what it returned. `stack` bytes are first
    /// copied below the thread's red zone; an argument of [`STACK`] stands for their address.
    /// The thread is put back as it was whatever happens.
    pub fn call(
        &mut self,
        tid: i32,
        func: u64,
        args: &[u64],
        stack: &[u8],
    ) -> Result<u64, Failure> {
        let saved = save(tid)?;
        let result = self.run(tid, &saved, func, args, stack);
        let restored = restore(tid, &saved);
        let value = result?;
        restored?;
        Ok(value)
    }

    fn run(
        &mut self,
        tid: i32,
        saved: &Saved,
        func: u64,
        args: &[u64],
        stack: &[u8],
    ) -> Result<u64, Failure> {
        let mem = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{}/mem", self.pid))
            .map_err(|e| format!("opening its memory: {e}"))?;
        // Below the red zone (128 bytes) the thread's stack is free to use.
        let data = (saved.regs.rsp - 128 - stack.len() as u64) & !15;
        // The return address, 0: the call ends in a fault there, which stops the thread.
        let rsp = ((data - 64) & !15) - 8;
        mem.write_all_at(stack, data)
            .and_then(|_| mem.write_all_at(&0u64.to_le_bytes(), rsp))
            .map_err(|e| format!("writing to its stack: {e}"))?;
        let mut regs = saved.regs;
        let value = |a: u64| if a == STACK { data } else { a };
        let mut it = args.iter().copied().map(value);
        regs.rdi = it.next().unwrap_or(0);
        regs.rsi = it.next().unwrap_or(0);
        regs.rdx = it.next().unwrap_or(0);
        regs.rcx = it.next().unwrap_or(0);
        regs.rip = func;
        regs.rsp = rsp;
        regs.rax = 0;
        // Not in a system call: nothing is restarted when the thread runs the call.
        regs.orig_rax = u64::MAX;
        set_regs(tid, &regs)?;
        ptrace(libc::PTRACE_CONT, tid, 0, 0).map_err(|e| format!("resuming thread {tid}: {e}"))?;
        let started = Instant::now();
        let mut others_running = false;
        loop {
            let Some(status) = wait(tid, Duration::from_millis(20))? else {
                let waited = started.elapsed();
                if !others_running && waited > Duration::from_millis(500) {
                    // Another (stopped) thread may hold a lock the call waits for: let them
                    // run; this one stays ours.
                    self.let_go_except(tid);
                    others_running = true;
                }
                if waited > Duration::from_secs(10) {
                    // Give up: stop it where it is and put it back.
                    let _ = ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
                    let _ = wait(tid, Duration::from_secs(1));
                    return Err("the call into it did not return within 10 s".into());
                }
                continue;
            };
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Err("it exited during the call".into());
            }
            let sig = libc::WSTOPSIG(status);
            if status >> 16 == 0 && sig == libc::SIGSEGV {
                let regs = get_regs(tid)?;
                if regs.rip == 0 {
                    return Ok(regs.rax);
                }
                return Err(format!(
                    "the call faulted at {:#x} (the thread is put back as it was)",
                    regs.rip
                ));
            }
            if status >> 16 == 0 {
                // A signal for the program: held until the thread is back where it was.
                self.pending.entry(tid).or_default().push(sig);
            }
            ptrace(libc::PTRACE_CONT, tid, 0, 0)
                .map_err(|e| format!("resuming thread {tid}: {e}"))?;
        }
    }

    /// Lets every thread but `keep` go, with its held signals.
    fn let_go_except(&mut self, keep: i32) {
        let tids: Vec<i32> = self.tids.iter().copied().filter(|&t| t != keep).collect();
        for tid in tids {
            self.detach(tid);
        }
    }

    fn detach(&mut self, tid: i32) {
        let sigs = self.pending.remove(&tid).unwrap_or_default();
        // The thread is stopped (or gone). A signal given to the detach would be dropped at an
        // interrupt's stop: the held ones are sent again, to the thread, once it runs.
        let _ = ptrace(libc::PTRACE_DETACH, tid, 0, 0);
        for sig in sigs {
            // SAFETY: plain syscall to a thread of the process.
            unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, sig) };
        }
        self.tids.retain(|&t| t != tid);
    }

    /// Lets every thread go; returns how long the process was stopped.
    pub fn release(&mut self) -> Duration {
        for tid in self.tids.clone() {
            self.detach(tid);
        }
        self.since.elapsed()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.release();
    }
}

/// An argument that stands for the address of the bytes copied to the stack.
pub const STACK: u64 = u64::MAX - 1;

fn get_regs(tid: i32) -> Result<libc::user_regs_struct, Failure> {
    // SAFETY: all-zero is a valid user_regs_struct.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize)
        .map_err(|e| format!("reading the registers of thread {tid}: {e}"))?;
    Ok(regs)
}

fn set_regs(tid: i32, regs: &libc::user_regs_struct) -> Result<(), Failure> {
    ptrace(libc::PTRACE_SETREGS, tid, 0, regs as *const _ as usize)
        .map_err(|e| format!("setting the registers of thread {tid}: {e}"))?;
    Ok(())
}

fn save(tid: i32) -> Result<Saved, Failure> {
    let regs = get_regs(tid)?;
    let mut xstate = vec![0u8; 16 << 10];
    let len = xstate_regset(tid, libc::PTRACE_GETREGSET, &mut xstate)
        .map_err(|e| format!("reading the vector registers of thread {tid}: {e}"))?;
    xstate.truncate(len);
    Ok(Saved { regs, xstate })
}

fn restore(tid: i32, saved: &Saved) -> Result<(), Failure> {
    set_regs(tid, &saved.regs)?;
    let mut xstate = saved.xstate.clone();
    xstate_regset(tid, libc::PTRACE_SETREGSET, &mut xstate)
        .map_err(|e| format!("restoring the vector registers of thread {tid}: {e}"))?;
    Ok(())
}

/// Reads (`PTRACE_GETREGSET`) or writes (`PTRACE_SETREGSET`) the thread's extended state
/// through `buf`; the bytes the kernel used.
fn xstate_regset(tid: i32, req: libc::c_uint, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    ptrace(
        req,
        tid,
        NT_X86_XSTATE as usize,
        &mut iov as *mut _ as usize,
    )?;
    Ok(iov.iov_len)
}

/// The pid tracing `pid` (its TracerPid; 0: none).
fn tracer_of(pid: i32) -> u32 {
    super::status_field(pid as u32, "TracerPid:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A NUL-terminated string of the process at `addr` (at most 4 KiB).
pub fn read_string(pid: i32, addr: u64) -> Option<String> {
    let mem = fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = mem.read_at(&mut buf, addr).ok()?;
    let end = buf[..n].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}
