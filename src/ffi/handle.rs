//! Opaque handles: a C pointer is a `Box<Tagged<T>>`. The tag is checked on
//! every call and cleared on free, so a stale or foreign pointer is usually
//! reported as INVALID_ARGUMENT instead of crashing. (Reading a freed block is
//! still undefined behaviour in C terms; this catches the common cases only.)

use crate::error::{Error, Result};

/// `repr(C)`: the tag is the first field whatever `T` is, so the tag of any
/// handle can be read before knowing what it points to.
#[repr(C)]
pub(crate) struct Tagged<T> {
    tag: u64,
    pub inner: T,
}

pub(crate) trait Kind {
    const TAG: u64;
    const NAME: &'static str;
}

pub(crate) fn into_raw<T: Kind, H>(inner: T) -> *mut H {
    Box::into_raw(Box::new(Tagged { tag: T::TAG, inner })) as *mut H
}

/// Is `p` a live handle of kind `T`? NULL → INVALID_ARGUMENT naming `arg`.
///
/// # Safety
/// `p` is NULL or points to a handle made by `into_raw` (of any kind) that
/// has not been deallocated: its first 8 bytes are readable.
unsafe fn check<T: Kind, H>(p: *const H, arg: &str) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid_arg(format!("{arg} is NULL")));
    }
    // SAFETY: our contract; `Tagged` is repr(C), so its tag is the first 8
    // bytes for every kind, read without assuming which kind it is.
    let tag = unsafe { (p as *const u64).read() };
    if tag != T::TAG {
        return Err(Error::invalid_arg(format!("{arg} is not a live {} (already freed, or another kind of handle)", T::NAME)));
    }
    Ok(())
}

/// Borrow the object behind a handle, checking NULL and the tag.
///
/// # Safety
/// As `check`; and no `&mut` to the object may be alive for `'a`.
pub(crate) unsafe fn get<'a, T: Kind, H>(p: *const H, arg: &str) -> Result<&'a T> {
    // SAFETY: our contract.
    unsafe { check::<T, H>(p, arg)? };
    // SAFETY: the tag says p is a live Tagged<T> made by into_raw.
    Ok(unsafe { &(*(p as *const Tagged<T>)).inner })
}

/// Borrow the object behind a handle mutably, checking NULL and the tag.
///
/// # Safety
/// As `check`; and no other reference to the object may be alive for `'a`
/// (the C contract: a non-const handle is used from one thread at a time).
pub(crate) unsafe fn get_mut<'a, T: Kind, H>(p: *mut H, arg: &str) -> Result<&'a mut T> {
    // SAFETY: our contract.
    unsafe { check::<T, H>(p, arg)? };
    // SAFETY: the tag says p is a live Tagged<T> made by into_raw; exclusive by our contract.
    Ok(unsafe { &mut (*(p as *mut Tagged<T>)).inner })
}

/// Free a handle: NULL is a no-op; a handle whose tag is gone is ignored.
///
/// # Safety
/// As `check`; no reference to the object may be alive.
pub(crate) unsafe fn free<T: Kind, H>(p: *mut H) {
    // SAFETY: our contract.
    if let Err(e) = unsafe { check::<T, H>(p, "handle") } {
        if !p.is_null() {
            crate::log::warn(usize::MAX, &format!("{}_free: {p:p}: {} (double free?); ignored", T::NAME, e.msg));
        }
        return;
    }
    let t = p as *mut Tagged<T>;
    // SAFETY: a live Tagged<T> from Box::into_raw (tag checked), freed once:
    // the tag is cleared first so a second free of the same pointer is
    // usually caught while the block is not yet reused.
    unsafe {
        (*t).tag = 0;
        drop(Box::from_raw(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    struct A(u32);
    struct B;
    impl Kind for A {
        const TAG: u64 = 1;
        const NAME: &'static str = "a";
    }
    impl Kind for B {
        const TAG: u64 = 2;
        const NAME: &'static str = "b";
    }
    struct Opaque;

    #[test]
    fn tags_are_checked() {
        let p: *mut Opaque = into_raw(A(5));
        // SAFETY: p came from into_raw and is live.
        assert_eq!(unsafe { get::<A, _>(p, "x") }.unwrap().0, 5);
        // SAFETY: as above; reading the tag of a live handle of another kind is sound.
        let e = unsafe { get::<B, _>(p, "x") }.err().unwrap();
        assert!(e.kind == ErrorKind::InvalidArgument && e.msg.contains("not a live b"), "{}", e.msg);
        // SAFETY: NULL is checked before any read.
        let e = unsafe { get::<A, _>(std::ptr::null::<Opaque>(), "fp") }.err().unwrap();
        assert!(e.msg.contains("fp is NULL"), "{}", e.msg);
        // SAFETY: p is live; freed exactly once; NULL is a no-op.
        unsafe {
            free::<A, _>(p);
            free::<A, _>(std::ptr::null_mut::<Opaque>());
        }
    }
}
