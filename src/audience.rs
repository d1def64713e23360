//! Audience files: CSV with a header row, one contact a row.
//!
//! A row's identity is its `username`, else its `phone` (normalized to
//! E.164), else its `user_id`. `first_name` and `last_name` are kept as such;
//! every other column becomes a contact field. A UTF-8 BOM and CRLF line ends
//! are accepted. A bad row is reported with `file:line` and skipped; the rest
//! is imported.

use std::collections::BTreeMap;
use std::path::Path;

use crate::model::Identity;
use crate::problem::{io_reason, Problem};

/// One contact as its audience file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    /// 1-based line of the row in the file.
    pub line: u64,
    pub identity: Identity,
    pub username: Option<String>,
    pub phone: Option<String>,
    pub user_id: Option<i64>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub fields: BTreeMap<String, String>,
}

/// What reading an audience file gave: the good rows and a problem per bad one.
#[derive(Debug, Default)]
pub struct AudienceFile {
    pub rows: Vec<ContactRow>,
    pub problems: Vec<Problem>,
    /// The file cannot be read as its header promises (or at all): none of
    /// it may be imported.
    pub refused: bool,
}

/// Reads an audience file. An unreadable, empty or binary file is one
/// problem and no rows.
pub fn read(path: &Path) -> AudienceFile {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => parse(&shown, &bytes),
        Err(e) => AudienceFile {
            rows: Vec::new(),
            problems: vec![Problem::new(
                shown,
                format!("cannot read the audience file: {}", io_reason(&e)),
            )],
            refused: true,
        },
    }
}

/// Parses audience CSV; `shown` names the file in problems.
pub fn parse(shown: &str, bytes: &[u8]) -> AudienceFile {
    match parse_rows(shown, bytes) {
        Ok(file) => file,
        Err(problem) => AudienceFile {
            rows: Vec::new(),
            problems: vec![problem],
            refused: true,
        },
    }
}

/// The rows and a problem per bad row, or the one problem that refuses
/// the whole file. The whole file is read before any row counts: a row
/// that is not what the header promises refuses the file, never a part
/// of it.
fn parse_rows(shown: &str, bytes: &[u8]) -> Result<AudienceFile, Problem> {
    let bytes = text_of(shown, bytes)?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let columns = match reader.headers() {
        Ok(h) => Columns::of(h).map_err(|why| Problem::new(shown, why))?,
        Err(e) => {
            return Err(Problem::new(
                shown,
                format!("has an unreadable header row ({e})"),
            ))
        }
    };
    let records: Vec<_> = reader.records().collect();
    let lines = Lines(bytes);
    let refuse = |line: u64, why: String| {
        Problem::new(
            format!("{shown}:{line}"),
            format!("{why}; the file is not imported until this is fixed"),
        )
    };
    if let Some((line, why)) = unclosed_quote(&records, &lines) {
        return Err(refuse(line, why));
    }
    let mut out = AudienceFile::default();
    for (i, record) in records.iter().enumerate() {
        let record = record.as_ref().map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            refuse(line, format!("cannot be read as CSV ({e})"))
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() != columns.names.len() {
            let next = records[i + 1..].iter().find_map(|r| r.as_ref().ok());
            return Err(refuse(line, misshapen(record, &columns, next, &lines)));
        }
        match columns.contact(record, line) {
            Ok(row) => out.rows.push(row),
            Err(why) => out.problems.push(Problem::new(
                format!("{shown}:{line}"),
                format!("{why}; row skipped"),
            )),
        }
    }
    Ok(out)
}

/// The file as text (without its BOM), unless it is binary, not UTF-8 or
/// empty.
fn text_of<'b>(shown: &str, bytes: &'b [u8]) -> Result<&'b [u8], Problem> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.contains(&0) {
        return Err(Problem::new(
            shown,
            "looks like a binary file, not CSV text",
        ));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        let line = Lines(bytes).at(e.valid_up_to() as u64);
        return Err(Problem::new(
            format!("{shown}:{line}"),
            "is not UTF-8 text; save the file as UTF-8",
        ));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Problem::new(
            shown,
            "is empty; it needs a header row such as \"username,first_name\"",
        ));
    }
    Ok(bytes)
}

/// Line numbers of the file's bytes.
struct Lines<'b>(&'b [u8]);

impl Lines<'_> {
    /// The 1-based line of byte offset `byte`.
    fn at(&self, byte: u64) -> u64 {
        let upto = (byte as usize).min(self.0.len());
        self.0[..upto].iter().filter(|b| **b == b'\n').count() as u64 + 1
    }

    /// The file's last line with text.
    fn last(&self) -> u64 {
        self.at(self.0.len() as u64) - u64::from(self.0.ends_with(b"\n"))
    }
}

/// A quote opened in the last record and never closed runs to the end of
/// the file, whatever the count of fields it leaves: its line and why.
fn unclosed_quote(
    records: &[csv::Result<csv::StringRecord>],
    lines: &Lines,
) -> Option<(u64, String)> {
    let p = records
        .iter()
        .rev()
        .find_map(|r| r.as_ref().ok()?.position())?;
    let rest = &lines.0[(p.byte() as usize).min(lines.0.len())..];
    if rest.iter().filter(|&&b| b == b'"').count() % 2 == 0 {
        return None;
    }
    let (line, last) = (p.line(), lines.last());
    let why = match last > line {
        true => format!(
            "a quote opened here is never closed; lines {line}–{last} would be read as one field"
        ),
        false => "a quote opened here is never closed".to_string(),
    };
    Some((line, why))
}

/// Why a record has another count of fields than the header: a quoted
/// field over several lines, or simply too few or too many.
fn misshapen(
    record: &csv::StringRecord,
    columns: &Columns,
    next: Option<&csv::StringRecord>,
    lines: &Lines,
) -> String {
    let line = record.position().map_or(0, |p| p.line());
    let end = match next.and_then(|r| r.position()) {
        Some(p) => lines.at(p.byte()) - 1,
        None => lines.last(),
    };
    let (fields, header) = (record.len(), columns.names.len());
    if end > line {
        format!(
            "a quoted field runs over lines {line}–{end}, which makes a row of {fields} fields where the header has {header}"
        )
    } else {
        let noun = if fields == 1 { "field" } else { "fields" };
        format!("has {fields} {noun} but the header has {header}")
    }
}

/// The header row: the columns' names (lowercase) and where the known ones are.
struct Columns {
    names: Vec<String>,
    username: Option<usize>,
    phone: Option<usize>,
    user_id: Option<usize>,
    first_name: Option<usize>,
    last_name: Option<usize>,
    timezone: Option<usize>,
}

impl Columns {
    fn of(header: &csv::StringRecord) -> Result<Columns, String> {
        let names: Vec<String> = header.iter().map(|s| s.to_ascii_lowercase()).collect();
        let col = |name: &str| names.iter().position(|h| h == name);
        let (username, phone, user_id) = (col("username"), col("phone"), col("user_id"));
        if username.is_none() && phone.is_none() && user_id.is_none() {
            return Err(format!(
                "has no username, phone or user_id column (header: {})",
                names.join(",")
            ));
        }
        Ok(Columns {
            username,
            phone,
            user_id,
            first_name: col("first_name"),
            last_name: col("last_name"),
            timezone: col(crate::config::TIMEZONE),
            names,
        })
    }

    /// The contact of a row of as many fields as the header, or why the
    /// row is skipped.
    fn contact(&self, record: &csv::StringRecord, line: u64) -> Result<ContactRow, String> {
        let get = |c: Option<usize>| {
            c.and_then(|i| record.get(i))
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        if let Some(z) = get(self.timezone).filter(|z| z.parse::<chrono_tz::Tz>().is_err()) {
            return Err(format!(
                "timezone \"{z}\" is not a known time zone (an IANA name like Europe/Berlin)"
            ));
        }
        let (identity, username, phone, user_id) = self.ids(&get)?;
        let known = [
            self.username,
            self.phone,
            self.user_id,
            self.first_name,
            self.last_name,
        ];
        let fields = self
            .names
            .iter()
            .enumerate()
            .filter(|(i, _)| !known.contains(&Some(*i)))
            .map(|(i, h)| (h.clone(), record.get(i).unwrap_or("").to_string()))
            .collect();
        Ok(ContactRow {
            line,
            identity,
            username,
            phone,
            user_id,
            first_name: get(self.first_name),
            last_name: get(self.last_name),
            fields,
        })
    }

    /// A row's identity (its username, else its phone, else its user id)
    /// and each of the three, normalized; or why the row has none.
    fn ids(&self, get: &dyn Fn(Option<usize>) -> Option<String>) -> Result<Ids, String> {
        let username = get(self.username)
            .map(|u| Identity::normalize_username(&u))
            .transpose()?;
        let phone = get(self.phone)
            .map(|p| Identity::normalize_phone(&p))
            .transpose()?;
        let user_id = get(self.user_id)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or_else(|| format!("user_id \"{v}\" is not a positive number"))
            })
            .transpose()?;
        let identity = match (&username, &phone, user_id) {
            (Some(u), _, _) => Identity::Username(u.clone()),
            (None, Some(p), _) => Identity::Phone(p.clone()),
            (None, None, Some(id)) => Identity::UserId(id),
            (None, None, None) => return Err("has no username, phone or user_id".into()),
        };
        Ok((identity, username, phone, user_id))
    }
}

type Ids = (Identity, Option<String>, Option<String>, Option<i64>);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> AudienceFile {
        parse("a.csv", s.as_bytes())
    }

    #[test]
    fn a_file_not_as_its_header_promises_is_refused_whole() {
        let mut good = String::from("username,first_name,city\n");
        for i in 0..10 {
            good.push_str(&format!("person_{i:02},P{i},Oslo\n"));
        }
        assert_eq!(parse_str(&good).rows.len(), 10);
        let cases = [
            (
                good.replace("person_03,P3", "\"person_03,P3"),
                "a.csv:5: a quote opened here is never closed; lines 5–11 would be read as one field; the file is not imported until this is fixed",
            ),
            (
                good.replace("person_03,P3,Oslo", "\"person_03\nP3\",Oslo"),
                "a.csv:5: a quoted field runs over lines 5–6, which makes a row of 2 fields where the header has 3",
            ),
            (
                format!("{good}person_10,\"P10,Oslo\n"),
                "a.csv:12: a quote opened here is never closed; the file is not imported",
            ),
            (
                format!("{good}person_10,P10,\"Oslo\n"),
                "a.csv:12: a quote opened here is never closed; the file is not imported",
            ),
            (
                good.replace("person_05,P5,Oslo", "person_05,P5,Oslo,extra"),
                "a.csv:7: has 4 fields but the header has 3; the file is not imported",
            ),
        ];
        for (text, want) in cases {
            let a = parse_str(&text);
            assert!(a.refused && a.rows.is_empty(), "{want}");
            let got = a.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>();
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(got[0].starts_with(want), "{}\n  wanted {want}", got[0]);
        }
        // A bad value in one row is that row's problem only.
        let a = parse_str(&good.replace("person_05", "5"));
        assert!(!a.refused);
        assert_eq!(a.rows.len(), 9);
    }

    #[test]
    fn identities_and_fields() {
        let a = parse_str(
            "username,phone,first_name,company\n@Alice_1,,Alice,Acme\n,+1 (555) 000-0001,Bob,\n",
        );
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.rows.len(), 2);
        assert_eq!(a.rows[0].identity, Identity::Username("alice_1".into()));
        assert_eq!(a.rows[0].fields["company"], "Acme");
        assert_eq!(a.rows[0].first_name.as_deref(), Some("Alice"));
        assert_eq!(a.rows[1].identity, Identity::Phone("+15550000001".into()));
        assert_eq!(a.rows[1].line, 3);
    }

    #[test]
    fn bom_and_crlf_are_accepted() {
        let a = parse("a.csv", b"\xEF\xBB\xBFuser_id,first_name\r\n42,Ann\r\n");
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.rows[0].identity, Identity::UserId(42));
    }

    #[test]
    fn bad_rows_are_reported_with_their_line_and_skipped() {
        let a = parse_str("phone,first_name\n+15550000001,A\nnot-a-phone,B\n,C\n+15550000002,D\n");
        assert_eq!(a.rows.len(), 2);
        let msgs: Vec<String> = a.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(
            msgs[0].starts_with("a.csv:3: phone \"not-a-phone\""),
            "{msgs:?}"
        );
        assert!(msgs[1].starts_with("a.csv:4: has no username"), "{msgs:?}");
    }

    #[test]
    fn whole_file_problems() {
        assert!(parse_str("").problems[0].message.contains("empty"));
        assert!(parse("b.csv", b"\x00\x01\x02").problems[0]
            .message
            .contains("binary"));
        assert!(parse_str("name,city\nx,y\n").problems[0]
            .message
            .contains("no username, phone or user_id column"));
    }

    #[test]
    fn phones_normalize_to_e164() {
        assert_eq!(
            Identity::normalize_phone("0049 30 1234567").unwrap(),
            "+49301234567"
        );
        assert_eq!(
            Identity::normalize_phone("15550000001").unwrap(),
            "+15550000001"
        );
        assert!(Identity::normalize_phone("+1 555").is_err());
        assert!(Identity::normalize_phone("+1555abc0001").is_err());
    }
}
