//! `LogService.QueryLogs`: pages through stored records of one or more plugins, oldest or
//! newest first, merged by receive time, with level, text, time and seq filters.
//!
//! Each plugin's part is read from its log in chunks through the indexes (time bounds
//! become seq bounds by binary search), so a page far back in a long history costs a seek,
//! not a scan of everything. The page token records, per plugin, the next seq to read, so
//! the next page continues exactly where this one ended.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use time::OffsetDateTime;

use crate::logs::capture::PluginLog;
use crate::logs::seqlog::{SeqLog, SeqLogError};
use crate::model::LogRecord;

/// Records read from one log at a time.
const CHUNK: usize = 256;

/// Records looked at for one page at most. A filter that keeps few records would otherwise
/// scan the whole history in one call; past this, the page is returned short (even empty)
/// with a token that continues the scan.
pub(crate) const MAX_SCANNED: usize = 50_000;

/// One plugin's part of a query.
pub(crate) struct Source {
    /// The plugin.
    pub id: String,
    log: SeqLog<LogRecord>,
    /// Lowest and highest seq still to read (inclusive); empty when lo > hi.
    lo: u64,
    hi: u64,
    buffer: VecDeque<Arc<LogRecord>>,
}

/// Bounds of a query.
pub(crate) struct Bounds {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub after_seq: u64,
    pub before_seq: u64,
}

impl Source {
    /// The part of `log` within `bounds`, resumed from `resume` (the next seq to read, from
    /// a page token). Blocking: seeks by time through the indexes.
    pub fn open(
        id: String,
        log: &PluginLog,
        bounds: &Bounds,
        resume: Option<u64>,
        newest_first: bool,
    ) -> Result<Self, SeqLogError> {
        let log = log.records().clone();
        let mut lo = log.first_seq().max(bounds.after_seq.saturating_add(1));
        let mut hi = log.last_seq();
        if bounds.before_seq > 0 {
            hi = hi.min(bounds.before_seq - 1);
        }
        if let Some(since) = bounds.since {
            lo = lo.max(log.seq_at(since)?);
        }
        if let Some(until) = bounds.until {
            hi = hi.min(log.seq_at(until)?.saturating_sub(1));
        }
        match (resume, newest_first) {
            (Some(next), false) => lo = lo.max(next),
            (Some(next), true) => hi = hi.min(next),
            (None, _) => {}
        }
        Ok(Source {
            id,
            log,
            lo,
            hi,
            buffer: VecDeque::new(),
        })
    }

    /// The next record in the query's order, reading a chunk when the buffer is empty.
    fn peek(&mut self, newest_first: bool) -> Result<Option<&Arc<LogRecord>>, SeqLogError> {
        if self.buffer.is_empty() && self.lo <= self.hi {
            let (lo, hi) = (self.lo, self.hi);
            let chunk: Vec<Arc<LogRecord>> = if newest_first {
                let from = hi.saturating_sub(CHUNK as u64 - 1).max(lo);
                let mut part = self.log.read_after(from - 1, CHUNK)?;
                part.retain(|r| r.seq <= hi);
                part.reverse();
                self.hi = from - 1;
                part
            } else {
                let mut part = self.log.read_after(lo - 1, CHUNK)?;
                part.retain(|r| r.seq <= hi);
                self.lo = part.last().map_or(hi + 1, |r| r.seq + 1);
                part
            };
            self.buffer = chunk.into();
        }
        Ok(self.buffer.front())
    }
}

/// A page: the records kept, and where each plugin resumes (`None`: done).
pub(crate) type Page<T> = (Vec<T>, Option<BTreeMap<String, u64>>);

/// How much one page may hold and look at.
pub(crate) struct Budget {
    /// Records returned at most.
    pub records: usize,
    /// Bytes of records returned at most (as measured by the caller's `size`); a page
    /// always holds at least one record, however large.
    pub bytes: usize,
    /// Records looked at at most.
    pub scanned: usize,
}

/// Merges sources by time (seq within a plugin) and returns the records `keep` turns into
/// output (`None`: filtered out), within `budget`, with the per-plugin resume points for the
/// next page (`None` when none is left). A record that would overflow the byte budget is
/// left for the next page.
pub(crate) fn page<T>(
    mut sources: Vec<Source>,
    budget: &Budget,
    newest_first: bool,
    keep: impl Fn(&str, &LogRecord) -> Option<T>,
    size: impl Fn(&T) -> usize,
) -> Result<Page<T>, SeqLogError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut scanned = 0;
    while out.len() < budget.records && scanned < budget.scanned {
        let Some(i) = next_source(&mut sources, newest_first)? else {
            break;
        };
        let source = &mut sources[i];
        let record = source.buffer.front().expect("peeked");
        if let Some(item) = keep(&source.id, record) {
            let cost = size(&item);
            if !out.is_empty() && bytes + cost > budget.bytes {
                break;
            }
            bytes += cost;
            out.push(item);
        }
        source.buffer.pop_front();
        scanned += 1;
    }
    let mut resume = BTreeMap::new();
    for source in &mut sources {
        let next = match source.buffer.front() {
            Some(r) => Some(r.seq),
            None if source.lo <= source.hi => {
                Some(if newest_first { source.hi } else { source.lo })
            }
            None => None,
        };
        if let Some(next) = next {
            resume.insert(source.id.clone(), next);
        }
    }
    Ok((out, (!resume.is_empty()).then_some(resume)))
}

/// The source whose next record comes first in the query's order; `None` when all are done.
fn next_source(sources: &mut [Source], newest_first: bool) -> Result<Option<usize>, SeqLogError> {
    let mut best: Option<(usize, (OffsetDateTime, u64))> = None;
    for (i, source) in sources.iter_mut().enumerate() {
        if let Some(r) = source.peek(newest_first)? {
            let key = (r.time, r.seq);
            let better = match &best {
                None => true,
                Some((_, k)) if newest_first => key > *k,
                Some((_, k)) => key < *k,
            };
            if better {
                best = Some((i, key));
            }
        }
    }
    Ok(best.map(|(i, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LogLevel, LogStream};

    #[test]
    fn a_selective_filter_pages_through_the_scan_instead_of_scanning_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = PluginLog::open(dir.path(), 1 << 20, 10).unwrap();
        for i in 0..1000 {
            log.note(LogLevel::Info, format!("line {i}"), 1);
        }
        let bounds = Bounds {
            since: None,
            until: None,
            after_seq: 0,
            before_seq: 0,
        };
        let wanted = |_: &str, r: &LogRecord| {
            (r.message == "line 950" && r.stream == LogStream::Supervisor).then(|| r.clone())
        };
        let budget = Budget {
            records: 10,
            bytes: usize::MAX,
            scanned: 100,
        };
        let mut resume = None;
        let mut pages = 0;
        let found = loop {
            let source = Source::open("p".into(), &log, &bounds, resume, false).unwrap();
            let (records, next) = page(vec![source], &budget, false, wanted, |_| 0).unwrap();
            pages += 1;
            if !records.is_empty() {
                break records;
            }
            resume = next
                .expect("a token while records remain")
                .get("p")
                .copied();
        };
        assert_eq!(found[0].message, "line 950");
        assert_eq!(pages, 10, "each page looks at 100 records");
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_and_the_next_resumes_at_the_record_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let log = PluginLog::open(dir.path(), 1 << 20, 10).unwrap();
        for i in 0..10 {
            log.note(LogLevel::Info, format!("{i}").repeat(1000), 1);
        }
        let bounds = Bounds {
            since: None,
            until: None,
            after_seq: 0,
            before_seq: 0,
        };
        let budget = Budget {
            records: 100,
            bytes: 2500,
            scanned: usize::MAX,
        };
        let keep = |_: &str, r: &LogRecord| Some(r.message.clone());
        let mut resume = None;
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        loop {
            let source = Source::open("p".into(), &log, &bounds, resume, false).unwrap();
            let (records, next) = page(vec![source], &budget, false, keep, String::len).unwrap();
            sizes.push(records.len());
            all.extend(records);
            match next {
                Some(next) => resume = next.get("p").copied(),
                None => break,
            }
        }
        assert_eq!(sizes, [2, 2, 2, 2, 2]);
        let want: Vec<String> = (0..10).map(|i| format!("{i}").repeat(1000)).collect();
        assert_eq!(all, want);

        // One record over the budget still comes back, alone.
        let tiny = Budget {
            bytes: 10,
            ..budget
        };
        let source = Source::open("p".into(), &log, &bounds, None, false).unwrap();
        let (records, _) = page(vec![source], &tiny, false, keep, String::len).unwrap();
        assert_eq!(records.len(), 1);
    }
}
