//! The in-memory caches' budgets: a number of entries, or the memory they may take.

use domain::keys::CacheBudget;

use super::{ConfigError, invalid, parse_positive};

/// The smallest memory budget of a cache.
const MIN_CACHE_BYTES: u64 = 64 * 1024;

/// A cache's budget: a whole number of entries, or a memory size with its unit (`64MiB`,
/// `500 MB`).
pub(super) fn parse_budget(variable: &'static str, text: &str) -> Result<CacheBudget, ConfigError> {
    let text = text.trim();
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return parse_positive(variable, text)
            .map(|n| CacheBudget::Entries(u64::try_from(n).unwrap_or(u64::MAX)));
    }
    match text.parse::<bytesize::ByteSize>() {
        Ok(size) if size.as_u64() >= MIN_CACHE_BYTES => Ok(CacheBudget::Bytes(size.as_u64())),
        Ok(_) => Err(invalid(variable, "must be at least 64KiB")),
        Err(_) => Err(invalid(
            variable,
            format!("{text:?} is neither a number of entries nor a size such as 128MiB"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_a_count_of_entries_or_a_size_with_its_unit() {
        let parse = |text| parse_budget("GRANTLINE_CONNECTION_CACHE", text).ok();
        assert_eq!(parse("100000"), Some(CacheBudget::Entries(100_000)));
        assert_eq!(parse(" 128MiB "), Some(CacheBudget::Bytes(128 << 20)));
        assert_eq!(parse("500 MB"), Some(CacheBudget::Bytes(500_000_000)));
        assert_eq!(parse("64KiB"), Some(CacheBudget::Bytes(65_536)));
        for bad in ["", "0", "63KiB", "-1MiB", "lots", "1.5 parsecs"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
