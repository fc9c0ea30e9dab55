//! Mooncake-format trace files: one JSON object a line with `timestamp` (ms), `input_length`,
//! `output_length` and `hash_ids` (prefix-chained ids of 512-token blocks).

use std::io::BufRead;

use serde::Deserialize;

use crate::BenchError;

/// Tokens per `hash_id` block in Mooncake traces.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    /// Arrival time in milliseconds, relative to the first request.
    pub timestamp: u64,
    /// Prompt length in tokens.
    pub input_length: u32,
    /// Output length in tokens.
    pub output_length: u32,
    /// Prefix-chained block ids; equal leading ids mean equal leading 512-token blocks.
    pub hash_ids: Vec<u64>,
}

/// Reads a whole trace, failing on the first malformed line with its 1-based line number.
/// Blank lines are skipped.
pub fn parse_trace(reader: impl BufRead) -> Result<Vec<TraceRecord>, BenchError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| BenchError::TraceIo {
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: TraceRecord =
            serde_json::from_str(&line).map_err(|source| BenchError::TraceLine {
                line: line_no,
                source,
            })?;
        if rec.input_length == 0 {
            return Err(BenchError::TraceInvalid {
                line: line_no,
                reason: "input_length must be positive",
            });
        }
        if rec.output_length == 0 {
            return Err(BenchError::TraceInvalid {
                line: line_no,
                reason: "output_length must be positive",
            });
        }
        let covered = u64::from(MOONCAKE_BLOCK_TOKENS) * rec.hash_ids.len() as u64;
        if rec.hash_ids.is_empty()
            || covered < u64::from(rec.input_length)
            || covered - u64::from(rec.input_length) >= u64::from(MOONCAKE_BLOCK_TOKENS)
        {
            return Err(BenchError::TraceInvalid {
                line: line_no,
                reason: "hash_ids must cover input_length in 512-token blocks (the last may be partial)",
            });
        }
        if let Some(prev) = out.last().map(|r: &TraceRecord| r.timestamp)
            && rec.timestamp < prev
        {
            return Err(BenchError::TraceInvalid {
                line: line_no,
                reason: "timestamps must not decrease",
            });
        }
        out.push(rec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_parse_and_blank_lines_are_skipped() {
        let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n\
                    {\"timestamp\": 7, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": [0]}\n";
        let recs = parse_trace(text.as_bytes()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].timestamp, 7);
        assert_eq!(recs[0].hash_ids, [0, 1]);
    }

    fn err_line(text: &str) -> (usize, String) {
        let e = parse_trace(text.as_bytes()).unwrap_err();
        let line = match &e {
            BenchError::TraceLine { line, .. }
            | BenchError::TraceInvalid { line, .. }
            | BenchError::TraceIo { line, .. } => *line,
            other => panic!("unexpected {other:?}"),
        };
        (line, e.to_string())
    }

    #[test]
    fn bad_lines_report_their_line_number() {
        let ok =
            "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [0]}\n";
        let (line, msg) = err_line(&format!(
            "{ok}{{\"timestamp\": 1, \"input_length\": \"x\"}}\n"
        ));
        assert_eq!(line, 2);
        assert!(msg.contains("line 2"), "{msg}");
        let (line, _) = err_line(&format!("{ok}{ok}not json\n"));
        assert_eq!(line, 3);
        let (line, msg) = err_line(
            "{\"timestamp\": 0, \"input_length\": 2000, \"output_length\": 5, \"hash_ids\": [0]}\n",
        );
        assert_eq!(line, 1);
        assert!(msg.contains("cover"), "{msg}");
        let (line, _) = err_line(&format!(
            "{ok}{{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 0, \"hash_ids\": [0]}}\n"
        ));
        assert_eq!(line, 2);
        let (line, msg) = err_line(&format!(
            "{}{ok}",
            ok.replace("\"timestamp\": 0", "\"timestamp\": 9")
        ));
        assert_eq!(line, 2);
        assert!(msg.contains("decrease"));
        let (_, msg) = err_line(
            "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [0], \"extra\": 1}\n",
        );
        assert!(msg.contains("extra"), "{msg}");
    }
}
