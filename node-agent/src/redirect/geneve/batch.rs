//! Text of one `iptables-restore --noflush` batch for one table, built line
//! by line.

use std::fmt::Write;

/// A batch for one table (`*table` ... `COMMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBatch {
    pub table: &'static str,
    lines: Vec<String>,
}

impl TableBatch {
    pub fn new(table: &'static str) -> Self {
        Self {
            table,
            lines: Vec::new(),
        }
    }

    pub fn line(&mut self, l: impl Into<String>) {
        self.lines.push(l.into());
    }

    /// True when the batch would change nothing.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The input for `iptables-restore`.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "*{}", self.table);
        for l in &self.lines {
            let _ = writeln!(s, "{l}");
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// All batches one after the other, as in a golden file.
pub fn render(batches: &[TableBatch]) -> String {
    batches.iter().map(TableBatch::text).collect()
}

/// One of our chains and the rules it must hold, in `iptables-save` form
/// (without `-A <chain>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    pub table: &'static str,
    pub chain: String,
    pub rules: Vec<String>,
}
