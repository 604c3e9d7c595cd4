//! Opaque handles: a C pointer is a `Box<Tagged<T>>`. The tag is checked on
//! every call and cleared on free, so a stale or foreign pointer is usually
//! reported as INVALID_ARGUMENT instead of crashing. (Reading a freed block is
//! still undefined behaviour in C terms; this catches the common cases only.)

use crate::error::{Error, Result};

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

/// Borrow the object behind a handle, checking NULL and the tag.
pub(crate) unsafe fn get<'a, T: Kind, H>(p: *const H, arg: &str) -> Result<&'a T> {
    if p.is_null() {
        return Err(Error::invalid_arg(format!("{arg} is NULL")));
    }
    let t = &*(p as *const Tagged<T>);
    if t.tag != T::TAG {
        return Err(Error::invalid_arg(format!("{arg} is not a live {} (already freed, or another kind of handle)", T::NAME)));
    }
    Ok(&t.inner)
}

pub(crate) unsafe fn get_mut<'a, T: Kind, H>(p: *mut H, arg: &str) -> Result<&'a mut T> {
    get::<T, H>(p, arg)?;
    Ok(&mut (*(p as *mut Tagged<T>)).inner)
}

/// Free a handle: NULL is a no-op; a handle whose tag is gone is ignored.
pub(crate) unsafe fn free<T: Kind, H>(p: *mut H) {
    if p.is_null() {
        return;
    }
    let t = p as *mut Tagged<T>;
    if (*t).tag != T::TAG {
        crate::log::warn(usize::MAX, &format!("{}_free: handle {p:p} is not live (double free?); ignored", T::NAME));
        return;
    }
    (*t).tag = 0;
    drop(Box::from_raw(t));
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
