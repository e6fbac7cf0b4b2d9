//! `--socket-group`: a group by name or number, so that members (QEMU
//! running as its own user, say) may connect to 0660 sockets.

/// Resolves a group name or numeric id to a gid.
pub(crate) fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("group {s:?} contains a NUL byte"))?;
    // SAFETY: an all-zero group is a valid out-parameter for getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call; buf's length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "looking up group {s:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Err(format!(
            "no group named {s:?}; create it (groupadd {s}) or give a numeric gid"
        ));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("root"), Ok(0));
        assert_eq!(parse_group("4242"), Ok(4242));
        assert!(
            parse_group("no-such-group-vbd")
                .unwrap_err()
                .contains("no group named")
        );
    }
}
