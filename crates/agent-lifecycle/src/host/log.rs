//! An instance's log: every line the instance produces (agent events, hook
//! output, the app's stdout and stderr) in one append-only sequence of
//! segment files, rotated by size, addressed by a byte offset that never
//! goes back, so a reader resumes exactly where it stopped.
//!
//! ```text
//! logs/00000000000000000000.log   lines [0, 8 MiB)
//! logs/00000000000008388700.log   lines [8388700, …)   ← the supervisor appends here
//! ```
//!
//! A segment is named by the offset of its first byte. Only the supervisor
//! writes; the daemon reads, so a daemon restart loses nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Default size at which a segment is closed and a new one begun.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// How many segments are kept (older ones are deleted).
pub const KEEP_SEGMENTS: usize = 4;

/// The segments in `dir` as (start offset, path), oldest first.
pub fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let start = name.to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((start, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.log"))
}

/// The offset just past the last byte written.
pub fn end_offset(dir: &Path) -> u64 {
    segments(dir)
        .last()
        .map_or(0, |(start, path)| start + file_len(path))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Appends whole lines, rotating by size.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    file: File,
    start: u64,
    len: u64,
    segment_bytes: u64,
}

impl LogWriter {
    /// Continues the log in `dir` (creating it) at its end.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<LogWriter> {
        std::fs::create_dir_all(dir)?;
        let (start, path) = segments(dir)
            .pop()
            .unwrap_or_else(|| (0, segment_path(dir, 0)));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let len = file.metadata()?.len();
        let mut writer = LogWriter {
            dir: dir.to_path_buf(),
            file,
            start,
            len,
            segment_bytes: segment_bytes.max(1024),
        };
        // A writer killed mid-line left a partial line: end it, so the next
        // line starts clean.
        if len > 0 {
            let mut last = [0u8];
            let mut f = File::open(&path)?;
            f.seek(SeekFrom::Start(len - 1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                writer.append(b"\n")?;
            }
        }
        Ok(writer)
    }

    /// The offset just past the last line.
    pub fn offset(&self) -> u64 {
        self.start + self.len
    }

    /// Appends `line` and a newline in one write.
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if self.len > 0 && self.len + bytes.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        self.append(&bytes)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let start = self.offset();
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, start))?;
        self.start = start;
        self.len = 0;
        let all = segments(&self.dir);
        if all.len() > KEEP_SEGMENTS {
            for (_, old) in &all[..all.len() - KEEP_SEGMENTS] {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }
}

/// What one read returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Whole lines with the offset just past each.
    pub lines: Vec<(u64, String)>,
    /// Where the next read starts.
    pub next: u64,
    /// The asked offset was rotated away; reading resumed at this offset.
    pub skipped_to: Option<u64>,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offset is past the end of the log.
    #[error("offset {offset} is beyond the end of the log ({end})")]
    BeyondEnd {
        /// Asked.
        offset: u64,
        /// The end.
        end: u64,
    },
    /// A segment could not be read.
    #[error("cannot read the log: {0}")]
    Io(#[from] io::Error),
}

/// Reads whole lines from `offset`, at most about `max_bytes`.
pub fn read_from(dir: &Path, offset: u64, max_bytes: usize) -> Result<Chunk, ReadError> {
    let segs = segments(dir);
    let end = segs
        .last()
        .map_or(0, |(start, path)| start + file_len(path));
    if offset > end {
        return Err(ReadError::BeyondEnd { offset, end });
    }
    let mut chunk = Chunk {
        next: offset,
        ..Chunk::default()
    };
    if let Some((first, _)) = segs.first()
        && offset < *first
    {
        chunk.skipped_to = Some(*first);
        chunk.next = *first;
    }
    let mut budget = max_bytes;
    for (i, (start, path)) in segs.iter().enumerate() {
        let seg_end = segs.get(i + 1).map_or(u64::MAX, |(s, _)| *s);
        if chunk.next >= seg_end || chunk.next < *start {
            continue;
        }
        let mut file = match File::open(path) {
            Ok(f) => f,
            // Rotated away between listing and opening: the next one follows.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(chunk.next - start))?;
        let mut buf = Vec::new();
        (&mut file).take(budget as u64 + 1).read_to_end(&mut buf)?;
        let complete = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => 0,
        };
        if complete == 0 && chunk.lines.is_empty() && buf.len() > budget {
            // One line longer than the whole budget: returning nothing would
            // leave every reader stuck at this offset for ever. Return its
            // start, marked, and resume after it once it has ended.
            let Some(len) = line_end(&mut file)? else {
                break;
            };
            chunk.next += buf.len() as u64 + len;
            buf.truncate(budget);
            let mut text = String::from_utf8_lossy(&buf).into_owned();
            text.push_str(TRUNCATED);
            chunk.lines.push((chunk.next, text));
            break;
        }
        for line in buf[..complete].split_inclusive(|b| *b == b'\n') {
            chunk.next += line.len() as u64;
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            chunk.lines.push((chunk.next, text));
        }
        budget = budget.saturating_sub(complete);
        let at_segment_end = chunk.next - start == file_len(path);
        if budget == 0 || !at_segment_end || segs.get(i + 1).is_none() {
            break;
        }
        // A closed segment ends with a whole line; move to the next one.
        chunk.next = seg_end;
    }
    Ok(chunk)
}

/// Appended to a line too long to return whole.
pub const TRUNCATED: &str = " [line truncated]";

/// Reads on from `file`'s position to the end of the current line: the
/// bytes up to and including its newline, or `None` when the line has not
/// ended yet. Keeps nothing in memory but one block.
fn line_end(file: &mut File) -> io::Result<Option<u64>> {
    let mut block = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(i) = block[..n].iter().position(|b| *b == b'\n') {
            return Ok(Some(read + i as u64 + 1));
        }
        read += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_rotation_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1024).unwrap();
        let line = "x".repeat(99);
        for _ in 0..25 {
            w.write_line(&line).unwrap();
        }
        assert_eq!(w.offset(), 2500);
        drop(w);
        let mut w = LogWriter::open(dir.path(), 1024).unwrap();
        w.write_line("last").unwrap();
        assert_eq!(w.offset(), 2505);
        assert_eq!(end_offset(dir.path()), 2505);
        assert_eq!(segments(dir.path()).len(), 3);

        let all = read_from(dir.path(), 0, 1 << 20).unwrap();
        assert_eq!(all.lines.len(), 26);
        assert_eq!(all.lines[9], (1000, line.clone()));
        assert_eq!(all.lines[25], (2505, "last".to_string()));
        assert_eq!(all.next, 2505);
        // Resuming mid-log returns exactly the rest.
        let rest = read_from(dir.path(), 2400, 1 << 20).unwrap();
        assert_eq!(rest.lines.len(), 2);
        // Small budgets make progress line by line.
        let small = read_from(dir.path(), 0, 150).unwrap();
        assert_eq!(small.lines.len(), 1);
        assert_eq!(small.next, 100);
        assert!(matches!(
            read_from(dir.path(), 9999, 10),
            Err(ReadError::BeyondEnd { end: 2505, .. })
        ));
    }

    #[test]
    fn old_segments_are_deleted_and_readers_skip_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1024).unwrap();
        for i in 0..100 {
            w.write_line(&format!("{i:099}")).unwrap();
        }
        assert_eq!(segments(dir.path()).len(), KEEP_SEGMENTS);
        let chunk = read_from(dir.path(), 0, 1 << 20).unwrap();
        let first = segments(dir.path())[0].0;
        assert_eq!(chunk.skipped_to, Some(first));
        assert_eq!(chunk.lines.last().unwrap().0, 10_000);
    }

    #[test]
    fn a_line_longer_than_the_budget_does_not_stall_readers() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 20).unwrap();
        let long = "y".repeat(300 * 1024);
        w.write_line(&long).unwrap();
        w.write_line("next").unwrap();
        let first = read_from(dir.path(), 0, 1000).unwrap();
        assert_eq!(first.lines.len(), 1);
        let (end, text) = &first.lines[0];
        assert_eq!(*end, long.len() as u64 + 1);
        assert_eq!(text, &format!("{}{TRUNCATED}", &long[..1000]));
        let rest = read_from(dir.path(), first.next, 1000).unwrap();
        assert_eq!(
            rest.lines,
            vec![(long.len() as u64 + 6, "next".to_string())]
        );
        // A long line still being written is not returned until it ends.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(segment_path(dir.path(), 0), "z".repeat(5000)).unwrap();
        let chunk = read_from(dir.path(), 0, 1000).unwrap();
        assert_eq!((chunk.lines.len(), chunk.next), (0, 0));
    }

    #[test]
    fn a_partial_last_line_is_not_returned_and_is_ended_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(segment_path(dir.path(), 0), "one\ntw").unwrap();
        let chunk = read_from(dir.path(), 0, 1 << 20).unwrap();
        assert_eq!(chunk.lines, vec![(4, "one".to_string())]);
        let mut w = LogWriter::open(dir.path(), 1 << 20).unwrap();
        w.write_line("three").unwrap();
        let chunk = read_from(dir.path(), 4, 1 << 20).unwrap();
        assert_eq!(
            chunk.lines,
            vec![(7, "tw".to_string()), (13, "three".to_string())]
        );
    }
}
