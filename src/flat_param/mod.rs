//! Flat parameters (FSDP-style sharding). See SPEC.md §2.
