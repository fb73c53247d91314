//! Everything a run measured, kept as JSON (`results.json` in the `--plots`
//! directory) so that the report and the charts can be made again without
//! measuring: `bufshare-bench --plot-from results.json`.

use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{part1, part2, part3};

/// Bumped when a change makes older files unreadable.
pub const FORMAT: u32 = 1;

/// The run's circumstances: the report's header and the charts' footnotes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Start of the run, seconds since the Unix epoch.
    pub started_unix_s: u64,
    pub cpus: usize,
    pub cpu_model: String,
    /// 1, 5 and 15 minute load averages at the start and at the end.
    pub load_start: String,
    pub load_end: String,
    pub wall_s: f64,
    pub gstreamer: String,
    /// Part 1: seconds of each run, warm-up before it.
    pub seconds: f64,
    pub warmup: f64,
    /// Part 2: seconds of each run.
    pub rate_seconds: f64,
    /// Where the plugin was loaded from, or why it was not usable.
    pub plugin: Result<String, String>,
    /// Which unixfd was measured, or why none was (None: not asked for).
    pub unixfd: Option<String>,
}

/// The whole of results.json.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    pub format: u32,
    pub meta: Meta,
    pub part1: Option<part1::Saved>,
    pub part2: Option<Vec<part2::LinkRow>>,
    /// Absent from files of bench versions without part 3.
    #[serde(default)]
    pub part3: Option<part3::Saved>,
    /// Errors of failed runs (their rows are absent or marked).
    pub errors: Vec<String>,
}

impl Saved {
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let json = serde_json::to_string(self).map_err(|e| format!("results as JSON: {e}"))?;
        std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Saved, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let version: Version = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a bufshare-bench results file: {e}", path.display()))?;
        if version.format != FORMAT {
            return Err(format!(
                "{}: results format {}, this bufshare-bench reads format {FORMAT}",
                path.display(),
                version.format
            ));
        }
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The markdown report (what the bench prints on stdout). `logs`: where
    /// the failed runs' logs were kept, if they were.
    pub fn report(&self, logs: Option<&Path>) -> Result<String, String> {
        let m = &self.meta;
        let mut out = String::new();
        let _ = writeln!(out, "# bufshare-bench\n");
        let _ = writeln!(out, "- machine: {} CPUs, {}", m.cpus, m.cpu_model);
        let _ = writeln!(
            out,
            "- load average (1/5/15 min): {} at start, {} at end; wall time {:.0} s",
            m.load_start, m.load_end, m.wall_s
        );
        let _ = writeln!(out, "- {}", m.gstreamer);
        if let Some(p1) = &self.part1 {
            let _ = writeln!(
                out,
                "- part 1: {} round(s) of {} s runs, each after a {} s warm-up",
                p1.rounds, m.seconds, m.warmup
            );
        }
        if self.part2.is_some() {
            let _ = writeln!(
                out,
                "- part 2: {} s per size, after a {} s warm-up",
                m.rate_seconds, m.warmup
            );
        }
        if self.part3.is_some() {
            let _ = writeln!(
                out,
                "- part 3: {} s live runs, {} s link-rate runs, each after a {} s warm-up",
                m.seconds, m.rate_seconds, m.warmup
            );
        }
        match &m.plugin {
            Ok(file) => {
                let _ = writeln!(out, "- bufshare plugin: {file}");
            }
            Err(p) => {
                let _ = writeln!(out, "- bufshare plugin: NOT USABLE: {p}");
            }
        }
        if let Some(unixfd) = &m.unixfd {
            let _ = writeln!(out, "- unixfd: {unixfd}");
        }
        let _ = writeln!(out);
        if let Some(p1) = &self.part1 {
            let (results, settings) = p1.restore()?;
            out.push_str(&part1::report(&results, &settings));
        }
        if let Some(rows) = &self.part2 {
            out.push_str(&part2::report(rows));
        }
        if let Some(p3) = &self.part3 {
            out.push_str(&part3::report(p3));
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "## Errors\n");
            for e in &self.errors {
                let _ = writeln!(out, "- {e}");
            }
            if let Some(logs) = logs {
                let _ = writeln!(out, "\n(logs kept in {})", logs.display());
            }
        }
        if let Err(problem) = &m.plugin {
            let _ = writeln!(out, "\nbufshare rows skipped: {problem}");
        }
        Ok(out)
    }
}

/// Civil date (UTC) of a Unix time, `YYYY-MM-DD`.
pub fn date(unix_s: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (unix_s / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::part1;

    pub fn fake(rounds: usize) -> Saved {
        let (results, settings) = part1::tests::fake(rounds);
        Saved {
            format: FORMAT,
            meta: Meta {
                started_unix_s: 1_796_083_200, // 2026-12-01
                cpus: 2,
                cpu_model: "Test CPU".into(),
                load_start: "0.40 0.30 0.20".into(),
                load_end: "0.50 0.40 0.30".into(),
                wall_s: 95.0,
                gstreamer: "GStreamer 1.22.0".into(),
                seconds: 2.0,
                warmup: 1.0,
                rate_seconds: 2.0,
                plugin: Ok("/x/libgstbufshare.so".into()),
                unixfd: Some("not installed (GStreamer 1.22)".into()),
            },
            part1: Some(part1::Saved::new(&results, &settings)),
            part2: Some(crate::part2::tests::fake()),
            part3: Some(crate::part3::tests::fake()),
            errors: vec!["round 1/2: 320x240 shm x3: it failed".into()],
        }
    }

    #[test]
    fn the_file_round_trip_gives_the_same_report() {
        let dir = crate::runner::TempDir::new().unwrap();
        let path = dir.path.join("results.json");
        let saved = fake(2);
        saved.write(&path).unwrap();
        let again = Saved::read(&path).unwrap();
        assert_eq!(again.meta, saved.meta);
        assert_eq!(again.part2, saved.part2);
        assert_eq!(again.part3, saved.part3);
        let report = saved.report(None).unwrap();
        assert_eq!(again.report(None).unwrap(), report);
        for part in [
            "- machine: 2 CPUs, Test CPU",
            "- part 1: 2 round(s) of 2 s runs, each after a 1 s warm-up",
            "## Part 1: fan-out",
            "## Part 2: highest rate of one link",
            "## Part 3: cross-host",
            "## Errors\n\n- round 1/2: 320x240 shm x3: it failed",
        ] {
            assert!(report.contains(part), "{part:?} not in\n{report}");
        }
    }

    #[test]
    fn files_that_are_not_results_are_refused() {
        let dir = crate::runner::TempDir::new().unwrap();
        let path = dir.path.join("other.json");
        std::fs::write(&path, r#"{"format": 99}"#).unwrap();
        let err = Saved::read(&path).err().unwrap();
        assert!(err.contains("results format 99"), "{err}");
        std::fs::write(&path, "[1, 2]").unwrap();
        let err = Saved::read(&path).err().unwrap();
        assert!(err.contains("not a bufshare-bench results file"), "{err}");
        let err = Saved::read(&dir.path.join("missing.json")).err().unwrap();
        assert!(err.contains("missing.json"), "{err}");
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_796_083_200), "2026-12-01");
    }
}
