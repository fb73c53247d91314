//! `bufshare top [SOCKET|DIR...]`: a live view of producers and their consumers, redrawn each
//! second, like `pw-top`. Each producer is watched by a thread of its own holding a monitor
//! connection (`monitor.rs`) that reads a STATS snapshot every second; the main thread
//! rescans the directories (default `$BUFSHARE_DIR`, else /run/bufshare) each second for new
//! sockets, draws the board with plain ANSI (alternate screen, home cursor, clear), and reads
//! the keyboard in raw mode: `q` or Ctrl-C quits and restores the terminal (SIGINT, SIGTERM
//! and SIGHUP too). Producers that go away stay on the board as gone; a socket removed from a
//! scanned directory leaves the board [`FORGET_AFTER`] later. A SOCKET argument that is
//! missing or not a socket ends `top` at start with one line and status 1.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstbufshare::protocol::{self, Stats};

use crate::args::TopArgs;
use crate::ls;
use crate::monitor::{self, Monitor, MonitorError, TIMEOUT};

/// Redraw and rescan period.
const REFRESH: Duration = Duration::from_secs(1);
/// How long a producer whose socket file disappeared stays on the board.
const FORGET_AFTER: Duration = Duration::from_secs(10);

/// Set by the signal handler: quit at the next check.
static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    QUIT.store(true, Ordering::SeqCst);
}

/// What the board shows for one socket.
#[derive(Debug, Clone)]
enum View {
    Connecting,
    Live(Box<Stats>),
    /// It was live; the connection ended at `since` for `why`.
    Gone {
        since: Instant,
        why: String,
    },
    /// It never became live (stale socket, refused, older protocol...).
    Failed(MonitorError),
}

struct Entry {
    view: View,
    /// Given on the command line (kept forever), not found by a scan.
    explicit: bool,
    /// When its socket file was last seen missing (scanned entries only).
    missing_since: Option<Instant>,
}

type Board = Arc<Mutex<BTreeMap<PathBuf, Entry>>>;

fn lock(board: &Board) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Entry>> {
    board.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps `d` in short slices; false when quitting or `path` left the board.
fn pause(board: &Board, path: &Path, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if QUIT.load(Ordering::SeqCst) || !lock(board).contains_key(path) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Watches one socket until it leaves the board: connects, reads snapshots, reconnects.
fn watch(board: Board, path: PathBuf) {
    let set = |view: View| {
        if let Some(e) = lock(&board).get_mut(&path) {
            e.view = view;
        }
    };
    loop {
        if QUIT.load(Ordering::SeqCst) || !lock(&board).contains_key(&path) {
            return;
        }
        match Monitor::connect(&path, TIMEOUT) {
            Ok(mut m) => loop {
                match m.next(TIMEOUT) {
                    Ok(s) => set(View::Live(Box::new(s))),
                    Err(e) => {
                        set(View::Gone {
                            since: Instant::now(),
                            why: e.cause(),
                        });
                        break;
                    }
                }
                if QUIT.load(Ordering::SeqCst) || !lock(&board).contains_key(&path) {
                    return;
                }
            },
            Err(e) => {
                // A producer that was live stays "gone" while its socket is stale or
                // missing; one never seen live shows why.
                if let Some(entry) = lock(&board).get_mut(&path) {
                    if !matches!(entry.view, View::Gone { .. }) {
                        entry.view = View::Failed(e);
                    }
                }
            }
        }
        if !pause(&board, &path, REFRESH) {
            return;
        }
    }
}

/// Puts the terminal in raw mode (no echo, keys one by one, Ctrl-C as a key) and on the
/// alternate screen; puts everything back when dropped.
struct Terminal {
    saved: Option<libc::termios>,
    screen: bool,
}

impl Terminal {
    fn setup() -> Terminal {
        // SAFETY: isatty/tcgetattr/tcsetattr on fds 0 and 1 with a termios we own.
        let saved = unsafe {
            if libc::isatty(0) == 1 {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(0, &mut t) == 0 {
                    let mut raw = t;
                    raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
                    raw.c_cc[libc::VMIN] = 1;
                    raw.c_cc[libc::VTIME] = 0;
                    libc::tcsetattr(0, libc::TCSANOW, &raw);
                    Some(t)
                } else {
                    None
                }
            } else {
                None
            }
        };
        // SAFETY: isatty on fd 1.
        let screen = unsafe { libc::isatty(1) == 1 };
        if screen {
            // Alternate screen, cursor hidden.
            print!("\x1b[?1049h\x1b[?25l");
            let _ = std::io::stdout().flush();
        }
        Terminal { saved, screen }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.screen {
            print!("\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
        }
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read in setup.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

/// Columns of the terminal (80 when unknown).
fn width() -> usize {
    // SAFETY: TIOCGWINSZ writes one winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            ws.ws_col as usize
        } else {
            80
        }
    }
}

/// Waits up to `d` for a key; true when it asks to quit (q, Q, Ctrl-C) or a signal came.
/// `stdin_open` goes false at end of file (then only signals end the view).
fn wait_for_quit(d: Duration, stdin_open: &mut bool) -> bool {
    let end = Instant::now() + d;
    loop {
        if QUIT.load(Ordering::SeqCst) {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        let slice = (end - now).min(Duration::from_millis(100));
        if !*stdin_open {
            std::thread::sleep(slice);
            continue;
        }
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, slice.as_millis() as libc::c_int) };
        if r <= 0 {
            continue; // timeout, or EINTR (a signal: checked above)
        }
        let mut buf = [0u8; 64];
        // SAFETY: reads into a buffer we own.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            *stdin_open = false;
            continue;
        }
        if buf[..n as usize]
            .iter()
            .any(|b| matches!(b, b'q' | b'Q' | 3))
        {
            return true;
        }
    }
}

/// The board's lines, each cut to `width` columns.
fn render(board: &BTreeMap<PathBuf, Entry>, width: usize) -> Vec<String> {
    let now = Instant::now();
    let live = board
        .values()
        .filter(|e| matches!(e.view, View::Live(_)))
        .count();
    let mut lines = vec![
        format!(
            "bufshare top: {} producers, {} live; refreshed every second; q or Ctrl-C quits",
            board.len(),
            live
        ),
        String::new(),
    ];
    if board.is_empty() {
        lines.push("no producer sockets found yet".into());
    }
    for (path, e) in board {
        match &e.view {
            View::Connecting => lines.push(format!("{}  connecting", path.display())),
            View::Live(s) => {
                let eos = if s.flags & protocol::STATS_EOS != 0 {
                    "  EOS"
                } else {
                    ""
                };
                lines.push(format!(
                    "{}  live  {} fps  held {}  copies {}  frames {}  backend {}  consumers {}{eos}",
                    path.display(),
                    monitor::fps(s.fps_milli),
                    monitor::held(s.held, s.max_held),
                    s.copies,
                    s.frames,
                    s.backend,
                    s.num_consumers
                ));
                let caps = if s.caps.is_empty() { "-" } else { &s.caps };
                lines.push(format!("  caps: {caps}"));
                if s.num_consumers > 0 {
                    lines.extend(monitor::consumer_rows(s, "  "));
                }
            }
            View::Gone { since, why } => lines.push(format!(
                "{}  gone {} s ago: {why}",
                path.display(),
                now.saturating_duration_since(*since).as_secs()
            )),
            View::Failed(err) => lines.push(format!(
                "{}  {}: {}",
                path.display(),
                err.state(),
                err.cause()
            )),
        }
        lines.push(String::new());
    }
    lines
        .into_iter()
        .map(|l| l.chars().take(width).collect())
        .collect()
}

pub fn run(args: &TopArgs) -> Result<(), String> {
    let targets: Vec<PathBuf> = if args.targets.is_empty() {
        vec![monitor::default_dir()]
    } else {
        args.targets.iter().map(PathBuf::from).collect()
    };
    let (dirs, sockets): (Vec<PathBuf>, Vec<PathBuf>) =
        targets.into_iter().partition(|t| ls::is_dir(t));
    // A SOCKET given that is missing or not a socket is an error at start; a stale or
    // refusing one is shown on the board (its producer may start later).
    for s in &sockets {
        monitor::check_socket_file(s).map_err(|e| e.to_string())?;
    }
    if !dirs.is_empty() {
        // A directory that cannot be read is an error at start (later, a rescan that fails
        // just finds nothing).
        ls::scan(&dirs)?;
    }
    let board: Board = Arc::new(Mutex::new(BTreeMap::new()));
    let add = |path: PathBuf, explicit: bool| {
        let mut b = lock(&board);
        if b.contains_key(&path) {
            return;
        }
        b.insert(
            path.clone(),
            Entry {
                view: View::Connecting,
                explicit,
                missing_since: None,
            },
        );
        let board = board.clone();
        std::thread::spawn(move || watch(board, path));
    };
    for s in sockets {
        add(s, true);
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let terminal = Terminal::setup();
    let mut stdin_open = true;
    loop {
        if !dirs.is_empty() {
            let found = ls::scan(&dirs).unwrap_or_default();
            for path in &found {
                add(path.clone(), false);
            }
            // Scanned sockets whose file went away leave the board after a while.
            let now = Instant::now();
            lock(&board).retain(|path, e| {
                if e.explicit || found.contains(path) {
                    e.missing_since = None;
                    return true;
                }
                let since = *e.missing_since.get_or_insert(now);
                now.saturating_duration_since(since) < FORGET_AFTER
            });
        }
        let lines = render(&lock(&board), width());
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[H\x1b[2J{}", lines.join("\n"));
        let _ = out.flush();
        drop(out);
        if wait_for_quit(REFRESH, &mut stdin_open) {
            break;
        }
    }
    QUIT.store(true, Ordering::SeqCst);
    drop(terminal);
    Ok(())
}
