//! Exact byte counts from Kubernetes quantities (`2Gi`, `1500M`, `1e9`), and
//! exact ratios of them. maxmemory is computed from these, so it must be exact
//! in bytes: floating point would be off by a few bytes on large limits.

/// Why a Kubernetes quantity could not be read as bytes.
/// Each variant is documented by its message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)]
pub enum QuantityError {
    #[error(
        "failed to parse quantity {0:?}: expected a non-negative number with an optional suffix \
         (Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E, m) such as 2Gi or 1500M"
    )]
    Invalid(String),
    #[error("failed to use quantity {0:?}: it is larger than this controller can represent")]
    TooLarge(String),
    #[error("failed to use ratio {0}: expected a finite number between 0 and 1")]
    Ratio(f64),
}

/// The quantity in whole units, rounded up as Kubernetes does for byte counts.
pub fn to_units(quantity: &str) -> Result<u64, QuantityError> {
    let invalid = || QuantityError::Invalid(quantity.to_owned());
    let too_large = || QuantityError::TooLarge(quantity.to_owned());
    let q = quantity.trim();
    let q = q.strip_prefix('+').unwrap_or(q);
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(invalid());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{whole}{fraction}");
    let mantissa: u128 = digits.parse().map_err(|_| too_large())?;
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .ok_or_else(too_large)?;

    // value = mantissa * numerator / (scale * denominator)
    let (numerator, denominator): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        s if s.starts_with(['e', 'E']) => {
            let exponent: i32 = s[1..].parse().map_err(|_| invalid())?;
            let power = 10u128
                .checked_pow(exponent.unsigned_abs())
                .ok_or_else(too_large)?;
            if exponent >= 0 {
                (power, 1)
            } else {
                (1, power)
            }
        }
        _ => return Err(invalid()),
    };
    let top = mantissa.checked_mul(numerator).ok_or_else(too_large)?;
    let bottom = scale.checked_mul(denominator).ok_or_else(too_large)?;
    u64::try_from(top.div_ceil(bottom)).map_err(|_| too_large())
}

/// `floor(ratio × bytes)`, exact: the ratio is taken at its shortest decimal
/// form (0.8 is 8/10, not 0.8000000000000000444).
pub fn ratio_of(bytes: u64, ratio: f64) -> Result<u64, QuantityError> {
    if !ratio.is_finite() || !(0.0..=1.0).contains(&ratio) {
        return Err(QuantityError::Ratio(ratio));
    }
    let text = format!("{ratio}");
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let numerator: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| QuantityError::Ratio(ratio))?;
    let denominator = 10u128
        .checked_pow(fraction.len() as u32)
        .ok_or(QuantityError::Ratio(ratio))?;
    // ratio <= 1, so the result fits whenever bytes does.
    Ok((u128::from(bytes) * numerator / denominator) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_exponent_suffixes() {
        assert_eq!(to_units("2Gi"), Ok(2_147_483_648));
        assert_eq!(to_units("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(to_units("512Mi"), Ok(536_870_912));
        assert_eq!(to_units("1500M"), Ok(1_500_000_000));
        assert_eq!(to_units("128974848"), Ok(128_974_848));
        assert_eq!(to_units("129e6"), Ok(129_000_000));
        assert_eq!(to_units("1k"), Ok(1000));
        assert_eq!(to_units("250m"), Ok(1), "milli-units round up to one");
        assert_eq!(to_units("0.5"), Ok(1));
        assert_eq!(
            to_units("1E3"),
            Ok(1000),
            "E followed by digits is an exponent"
        );
        assert_eq!(
            to_units("1E"),
            Ok(1_000_000_000_000_000_000),
            "a bare E is exa"
        );
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in ["", "Gi", "-1Gi", "1.2.3", "2GB", "1 Gi", "abc", "1e"] {
            assert!(
                matches!(to_units(bad), Err(QuantityError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(to_units("100Ei"), Err(QuantityError::TooLarge(_))));
    }

    #[test]
    fn ratios_are_exact() {
        // The reference design's figure: 80% of a 2Gi limit.
        assert_eq!(ratio_of(2_147_483_648, 0.8), Ok(1_717_986_918));
        assert_eq!(ratio_of(1 << 40, 0.95), Ok(1_044_536_046_387));
        assert_eq!(ratio_of(1000, 1.0), Ok(1000));
        assert_eq!(ratio_of(3, 0.5), Ok(1));
        assert!(ratio_of(1, 1.5).is_err());
        assert!(ratio_of(1, f64::NAN).is_err());
    }
}
