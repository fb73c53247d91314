//! `bufshare top [SOCKET|DIR...]`: a live view of producers and their consumers, redrawn each
//! second, like `pw-top`. Each producer is watched by a thread of its own holding a monitor
//! connection (`monitor.rs`) that reads a STATS snapshot every second; the main thread
//! rescans the directories (default `$BUFSHARE_DIR`, else /run/bufshare) each second for new
//! sockets, draws the board with plain ANSI (alternate screen, home cursor, clear), and reads
//! the keyboard in raw mode: `q` or Ctrl-C quits and restores the terminal (SIGINT, SIGTERM
//! and SIGHUP too). Producers that go away stay on the board as gone; a socket removed from a
//! scanned directory leaves the board [`FORGET_AFTER`] later. A SOCKET argument that is
//! missing or not a socket ends `top` at start with one line and status 1.
//!
//! On a terminal the board is cut to the window's height (a last line says how many lines did
//! not fit). When standard output is not a terminal, or with `-b`, there is no screen: each
//! refresh is printed as plain text after the previous one, headed by the time, like
//! `top -b`; `-n COUNT` stops after COUNT refreshes.

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
    /// `screen`: take over the screen (raw keys, alternate screen); false in batch mode,
    /// where the keyboard is left alone (q then needs Enter; Ctrl-C works as usual).
    fn setup(screen: bool) -> Terminal {
        if !screen {
            return Terminal {
                saved: None,
                screen: false,
            };
        }
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

/// Columns and rows of the terminal on standard output, when it is one.
fn window_size() -> Option<(usize, usize)> {
    // SAFETY: TIOCGWINSZ writes one winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0)
            .then_some((ws.ws_col as usize, ws.ws_row as usize))
    }
}

/// At most `rows` of `lines`: when they do not fit, the last row says how many were left out.
fn fit_height(mut lines: Vec<String>, rows: usize) -> Vec<String> {
    // Trailing blank lines are not worth a note.
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.len() <= rows || rows == 0 {
        return lines;
    }
    let kept = rows - 1;
    let left = lines.len() - kept;
    lines.truncate(kept);
    lines.push(format!(
        "... {left} more lines: enlarge the window, or see bufshare top -b or bufshare dump SOCKET"
    ));
    lines
}

/// The time of day (UTC) as HH:MM:SS, for batch snapshots.
fn clock_time() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
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
    // SAFETY: isatty on fd 1.
    let on_terminal = unsafe { libc::isatty(1) == 1 };
    let batch = args.batch || !on_terminal;
    let terminal = Terminal::setup(!batch);
    let mut stdin_open = true;
    let mut refreshes = 0u32;
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
        if batch && refreshes == 0 {
            // A snapshot is worth printing once every producer has answered (or failed).
            let end = Instant::now() + TIMEOUT;
            while Instant::now() < end
                && !QUIT.load(Ordering::SeqCst)
                && lock(&board)
                    .values()
                    .any(|e| matches!(e.view, View::Connecting))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut out = std::io::stdout().lock();
        let written = if batch {
            let mut lines = render(&lock(&board), usize::MAX);
            // No keys in batch mode: the header's hint is for the screen.
            if let Some(head) = lines.first_mut() {
                if let Some(cut) = head.find("; q or Ctrl-C quits") {
                    head.truncate(cut);
                }
            }
            writeln!(out, "{}\n{}\n", clock_time(), lines.join("\n").trim_end())
        } else {
            let (cols, rows) = window_size().unwrap_or((80, 24));
            let lines = fit_height(render(&lock(&board), cols), rows);
            write!(out, "\x1b[H\x1b[2J{}", lines.join("\n"))
        };
        let _ = out.flush();
        drop(out);
        // A reader that went away (bufshare top | head) ends the view.
        if written.is_err() {
            break;
        }
        refreshes += 1;
        if args.iterations.is_some_and(|n| refreshes >= n) {
            break;
        }
        if wait_for_quit(REFRESH, &mut stdin_open) {
            break;
        }
    }
    QUIT.store(true, Ordering::SeqCst);
    drop(terminal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("line {i}")).collect()
    }

    #[test]
    fn a_board_taller_than_the_window_is_cut_with_a_note() {
        assert_eq!(fit_height(lines(3), 5), lines(3));
        assert_eq!(fit_height(lines(5), 5), lines(5));
        let cut = fit_height(lines(8), 5);
        assert_eq!(cut.len(), 5);
        assert_eq!(cut[..4], lines(4)[..]);
        assert!(cut[4].starts_with("... 4 more lines"), "{cut:?}");
        // Blank lines at the end do not count.
        let mut padded = lines(5);
        padded.extend([String::new(), String::new()]);
        assert_eq!(fit_height(padded, 5), lines(5));
    }
}
