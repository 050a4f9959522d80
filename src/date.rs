//! Calendar arithmetic shared by the log line timestamps (`logging`) and the Date: and
//! Received: dates of stored messages (`store::maildir`): days since the epoch to a civil date.

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01, proleptic Gregorian.
/// Howard Hinnant's `civil_from_days` (<http://howardhinnant.github.io/date_algorithms.html>).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_from_days_round_trips_every_day_for_a_thousand_years() {
        // Oracle: walk the calendar one day at a time with the leap-year rule.
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for days in 0..366_000i64 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ][m as usize - 1];
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }
}
