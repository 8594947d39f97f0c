//! Arguments of table-valued functions (eponymous virtual tables whose hidden columns take the
//! arguments): planning which are bound, and reading them back in `xFilter`.
//!
//! The plan's `idx_num` is a bitmask of the bound arguments (bit i = the i-th argument), and they
//! are passed to `xFilter` in argument order.

use std::ffi::c_int;

use rusqlite::types::ValueRef;
use rusqlite::vtab::{Filters, IndexConstraintOp, IndexInfo};

/// Binds `=` constraints on the argument columns `columns` (in argument order). Returns `None`
/// (the caller then answers `false` and SQLite tries another join order) when one of the first
/// `required` arguments is constrained but not usable yet, i.e. it comes from a table later in
/// a join; otherwise sets the plan, with a huge cost when a required argument is missing
/// altogether (xFilter then says which), and returns whether all required arguments are bound.
pub fn bind(info: &mut IndexInfo, columns: &[c_int], required: usize) -> Option<bool> {
    let mut found: Vec<Option<usize>> = vec![None; columns.len()];
    let mut unusable = false;
    for (i, c) in info.constraints().enumerate() {
        let Some(slot) = columns.iter().position(|&col| col == c.column()) else {
            continue;
        };
        if c.operator() != IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ {
            continue;
        }
        if c.is_usable() {
            found[slot] = Some(i);
        } else {
            unusable = true;
        }
    }
    let complete = found[..required].iter().all(Option::is_some);
    if unusable && !complete {
        return None;
    }
    let (mut mask, mut argv) = (0, 0);
    for (slot, constraint) in found.iter().enumerate() {
        if let Some(i) = constraint {
            argv += 1;
            mask |= 1 << slot;
            let mut usage = info.constraint_usage(*i);
            usage.set_argv_index(argv);
            usage.set_omit(true);
        }
    }
    info.set_idx_num(mask);
    info.set_estimated_cost(if complete { 1_000.0 } else { 1e12 });
    info.set_estimated_rows(if complete { 100 } else { i64::MAX });
    Some(complete)
}

/// The arguments as bound by [`bind`]: `None` for those not given.
pub fn values<'a>(
    idx_num: c_int,
    args: &'a Filters<'a>,
    count: usize,
) -> Vec<Option<ValueRef<'a>>> {
    let mut given = args.iter();
    (0..count)
        .map(|slot| (idx_num & (1 << slot) != 0).then(|| given.next().unwrap_or(ValueRef::Null)))
        .collect()
}
