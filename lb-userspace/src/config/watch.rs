//! When a changed configuration file may be reloaded. `cat > file`, `cp` and
//! most editors truncate first and write after, so a read can see half a file
//! or none. A change is taken only once two reads, at least `settle` apart,
//! return the same bytes; the reload then parses exactly those bytes (the file
//! is not read again).

use std::time::{Duration, Instant};

/// What the watcher knows of the file.
#[derive(Debug)]
pub struct FileWatch {
    /// The text last handed out (applied or rejected): not reloaded again.
    seen: String,
    /// A new text and when it was first read, waiting to be read again unchanged.
    pending: Option<(String, Instant)>,
    settle: Duration,
}

impl FileWatch {
    pub fn new(current: String, settle: Duration) -> Self {
        Self { seen: current, pending: None, settle }
    }

    /// Takes one read of the file at `now`; returns the text to reload, once
    /// it is stable. A failed read (the file being replaced) changes nothing.
    pub fn observe(&mut self, read: std::io::Result<String>, now: Instant) -> Option<String> {
        let Ok(text) = read else { return None };
        if text == self.seen {
            self.pending = None;
            return None;
        }
        match &self.pending {
            Some((p, since)) if *p == text && now.duration_since(*since) >= self.settle => {
                self.pending = None;
                self.seen = text.clone();
                Some(text)
            }
            Some((p, _)) if *p == text => None,
            _ => {
                self.pending = Some((text, now));
                None
            }
        }
    }

    /// A reload that read the file by itself (SIGHUP, `xdplb reload`): that
    /// text is seen, so the watcher does not reload it a second time.
    pub fn seen(&mut self, text: &str) {
        self.seen = text.to_string();
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_taken_once_two_reads_a_settle_apart_agree() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = FileWatch::new("vips: [a]\n".into(), Duration::from_millis(200));
        assert_eq!(w.observe(Ok("vips: [a]\n".into()), ms(0)), None, "unchanged");
        // Truncated, then half written: never taken.
        assert_eq!(w.observe(Ok(String::new()), ms(1000)), None);
        assert_eq!(w.observe(Ok("vips: [a, b".into()), ms(1100)), None);
        assert_eq!(w.observe(Ok("vips: [a, b]\n".into()), ms(1150)), None, "first sight of the full file");
        assert_eq!(w.observe(Ok("vips: [a, b]\n".into()), ms(1250)), None, "too soon to be sure");
        assert_eq!(w.observe(Ok("vips: [a, b]\n".into()), ms(1400)), Some("vips: [a, b]\n".into()));
        assert_eq!(w.observe(Ok("vips: [a, b]\n".into()), ms(2400)), None, "taken once");
        // A failed read (mid-rename) is not a change.
        assert_eq!(w.observe(Err(std::io::ErrorKind::NotFound.into()), ms(2500)), None);
        // A SIGHUP reload that read the new text itself: the watcher does not repeat it.
        w.observe(Ok("vips: []\n".into()), ms(3000));
        w.seen("vips: []\n");
        assert_eq!(w.observe(Ok("vips: []\n".into()), ms(4000)), None);
    }
}
