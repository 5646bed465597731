//! Value types with a text form in the profile: durations (`30s`, `5m`),
//! pauses (`manual` or a duration), and Kubernetes quantities for CPU and
//! memory. Each parses from its text once, keeps that text for rendering, and
//! tells the schema walker which `format` checks it.

use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A span of time written as a number and a unit: `500ms`, `30s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    millis: u64,
}

impl Duration {
    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self {
            millis: secs * 1000,
        }
    }

    /// The duration in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// The duration in seconds, rounded up (Kubernetes counts whole seconds).
    pub const fn as_secs_ceil(self) -> u64 {
        self.millis.div_ceil(1000)
    }

    /// Parses `500ms`, `30s`, `5m`, `1h` or `1d`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit; write it like 500ms, 30s, 5m or 1h"))?;
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(format!(
                "`{text}` does not start with a number; write it like 30s or 5m"
            ));
        }
        let value: u64 = number
            .parse()
            .map_err(|_| format!("`{text}` is too large"))?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{text}` has an unknown unit `{unit}`; use ms, s, m, h or d"
                ));
            }
        };
        let millis = value
            .checked_mul(factor)
            .filter(|m| *m <= 365 * 86_400_000)
            .ok_or_else(|| format!("`{text}` is longer than a year"))?;
        Ok(Self { millis })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.millis;
        match () {
            _ if m == 0 => write!(f, "0s"),
            _ if m.is_multiple_of(3_600_000) => write!(f, "{}h", m / 3_600_000),
            _ if m.is_multiple_of(60_000) => write!(f, "{}m", m / 60_000),
            _ if m.is_multiple_of(1000) => write!(f, "{}s", m / 1000),
            _ => write!(f, "{m}ms"),
        }
    }
}

/// How a release waits between two batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Wait until a person resumes the release.
    Manual,
    /// Wait this long, then go on (`0s` means no pause).
    For(Duration),
}

impl Pause {
    /// Parses `manual` or a duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "manual" {
            return Ok(Self::Manual);
        }
        Duration::parse(text)
            .map(Self::For)
            .map_err(|e| format!("{e}; or write `manual` to wait until the release is resumed"))
    }
}

impl fmt::Display for Pause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manual => f.write_str("manual"),
            Self::For(d) => d.fmt(f),
        }
    }
}

/// Which resource a [`Quantity`] measures; they accept different suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityKind {
    /// CPU, in cores or millicores (`500m`, `2`, `1.5`).
    Cpu,
    /// Memory, in bytes with a suffix (`512Mi`, `2Gi`, `1G`).
    Memory,
}

/// A Kubernetes quantity, kept as written and parsed to a canonical amount
/// (millicores for CPU, bytes for memory) for the checks that compare them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantity {
    text: String,
    amount: u64,
}

impl Quantity {
    /// The quantity as written, which Kubernetes accepts as is.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Millicores for CPU, bytes for memory.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Parses `text` as a quantity of `kind`.
    pub fn parse(text: &str, kind: QuantityKind) -> Result<Self, String> {
        let hint = match kind {
            QuantityKind::Cpu => "write CPU as cores or millicores, like 2, 1.5 or 500m",
            QuantityKind::Memory => "write memory as bytes with a suffix, like 512Mi, 2Gi or 1G",
        };
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty()
            || fraction.contains('.')
            || (number.contains('.') && fraction.is_empty())
        {
            return Err(format!("`{text}` is not a quantity; {hint}"));
        }
        // Work in thousandths so `1.5` and `500m` stay exact.
        let frac3 = format!("{fraction:0<3}");
        if frac3.len() > 3 {
            return Err(format!("`{text}` has more than three decimals; {hint}"));
        }
        let milli_units = whole
            .parse::<u64>()
            .ok()
            .and_then(|w| w.checked_mul(1000))
            .and_then(|w| w.checked_add(frac3.parse::<u64>().unwrap_or(0)))
            .ok_or_else(|| format!("`{text}` is too large"))?;
        let multiplier_milli: u64 = match (kind, suffix) {
            (QuantityKind::Cpu, "") => 1000,
            (QuantityKind::Cpu, "m") => 1,
            (QuantityKind::Memory, "") => 1,
            (QuantityKind::Memory, "k") => 1_000,
            (QuantityKind::Memory, "M") => 1_000_000,
            (QuantityKind::Memory, "G") => 1_000_000_000,
            (QuantityKind::Memory, "T") => 1_000_000_000_000,
            (QuantityKind::Memory, "Ki") => 1 << 10,
            (QuantityKind::Memory, "Mi") => 1 << 20,
            (QuantityKind::Memory, "Gi") => 1 << 30,
            (QuantityKind::Memory, "Ti") => 1 << 40,
            _ => return Err(format!("`{text}` has an unknown suffix `{suffix}`; {hint}")),
        };
        let amount = milli_units
            .checked_mul(multiplier_milli)
            .map(|v| match kind {
                QuantityKind::Cpu => v / 1000,
                QuantityKind::Memory => v / 1000,
            })
            .ok_or_else(|| format!("`{text}` is too large"))?;
        if kind == QuantityKind::Cpu && suffix == "m" && !fraction.is_empty() {
            return Err(format!("`{text}`: millicores are whole numbers; {hint}"));
        }
        if kind == QuantityKind::Memory && amount == 0 && milli_units != 0 {
            return Err(format!("`{text}` is less than one byte; {hint}"));
        }
        Ok(Self {
            text: text.to_string(),
            amount,
        })
    }

    /// A memory quantity of `bytes`, written in the largest binary unit that
    /// divides it.
    pub fn memory_bytes(bytes: u64) -> Self {
        let text = [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)]
            .iter()
            .find(|(_, shift)| bytes != 0 && bytes.is_multiple_of(1u64 << shift))
            .map(|(suffix, shift)| format!("{}{suffix}", bytes >> shift))
            .unwrap_or_else(|| bytes.to_string());
        Self {
            text,
            amount: bytes,
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Text of a scalar that may be written as a YAML number or string.
fn scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or number, found {other}"
        ))),
    }
}

macro_rules! text_value {
    ($ty:ident, $name:literal, $format:literal, $pattern:literal, $doc:literal, |$s:ident| $parse:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let $s = scalar_text(d)?;
                $parse.map_err(serde::de::Error::custom)
            }
        }
        impl JsonSchema for $ty {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": ["string", "number"],
                    "format": $format,
                    "pattern": $pattern,
                    "description": $doc,
                })
            }
        }
    };
}

text_value!(
    Duration,
    "Duration",
    "duration",
    "^[0-9]+(ms|s|m|h|d)$",
    "A duration: a whole number and a unit (ms, s, m, h, d), like 30s or 5m.",
    |s| Duration::parse(&s)
);
text_value!(
    Pause,
    "Pause",
    "pause",
    "^(manual|[0-9]+(ms|s|m|h|d))$",
    "`manual`, or a duration like 30s.",
    |s| Pause::parse(&s)
);

/// A CPU quantity (`500m`, `2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuQuantity(pub Quantity);
/// A memory quantity (`512Mi`, `2Gi`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryQuantity(pub Quantity);

impl fmt::Display for CpuQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Display for MemoryQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

text_value!(
    CpuQuantity,
    "CpuQuantity",
    "cpu-quantity",
    "^[0-9]+(\\.[0-9]{1,3})?m?$",
    "CPU in cores or millicores, like 2, 1.5 or 500m.",
    |s| Quantity::parse(&s, QuantityKind::Cpu).map(CpuQuantity)
);
text_value!(
    MemoryQuantity,
    "MemoryQuantity",
    "memory-quantity",
    "^[0-9]+(\\.[0-9]{1,3})?(k|M|G|T|Ki|Mi|Gi|Ti)?$",
    "Memory in bytes with a suffix, like 512Mi, 2Gi or 1G.",
    |s| Quantity::parse(&s, QuantityKind::Memory).map(MemoryQuantity)
);

/// Checks a scalar's text against a `format` named in the schema; the schema
/// walker calls this so format errors carry their position.
pub fn check_format(format: &str, text: &str) -> Option<Result<(), String>> {
    Some(match format {
        "duration" => Duration::parse(text).map(drop),
        "pause" => Pause::parse(text).map(drop),
        "cpu-quantity" => Quantity::parse(text, QuantityKind::Cpu).map(drop),
        "memory-quantity" => Quantity::parse(text, QuantityKind::Memory).map(drop),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("30s").unwrap().as_millis(), 30_000);
        assert_eq!(Duration::parse("5m").unwrap().to_string(), "5m");
        assert_eq!(Duration::parse("1500ms").unwrap().as_secs_ceil(), 2);
        assert!(Duration::parse("30").unwrap_err().contains("no unit"));
        assert!(
            Duration::parse("3w")
                .unwrap_err()
                .contains("unknown unit `w`")
        );
        assert!(Duration::parse("s").is_err());
        assert!(Duration::parse("99999999999999999999s").is_err());
    }

    #[test]
    fn pauses() {
        assert_eq!(Pause::parse("manual").unwrap(), Pause::Manual);
        assert_eq!(
            Pause::parse("10s").unwrap(),
            Pause::For(Duration::from_secs(10))
        );
        assert!(Pause::parse("later").unwrap_err().contains("manual"));
    }

    #[test]
    fn quantities() {
        let cpu = |s| Quantity::parse(s, QuantityKind::Cpu).map(|q| q.amount());
        let mem = |s| Quantity::parse(s, QuantityKind::Memory).map(|q| q.amount());
        assert_eq!(cpu("500m"), Ok(500));
        assert_eq!(cpu("2"), Ok(2000));
        assert_eq!(cpu("1.5"), Ok(1500));
        assert!(cpu("1.5m").is_err());
        assert!(cpu("2Gi").is_err());
        assert_eq!(mem("1Gi"), Ok(1 << 30));
        assert_eq!(mem("1.5Gi"), Ok(3 << 29));
        assert_eq!(mem("1G"), Ok(1_000_000_000));
        assert!(mem("1GB").unwrap_err().contains("unknown suffix `GB`"));
        assert!(mem("").is_err());
        assert!(mem(".5Gi").is_err());
        assert!(mem("1.").is_err());
        assert!(mem("1.2.3Gi").is_err());
        assert_eq!(Quantity::memory_bytes(1536 << 20).as_str(), "1536Mi");
        assert_eq!(Quantity::memory_bytes(2 << 30).as_str(), "2Gi");
    }
}
