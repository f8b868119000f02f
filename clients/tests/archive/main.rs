//! The archive end to end: a real broker, the real subscriber binary, SQLite files and
//! a real PostgreSQL server started by the tests themselves.

mod cli;
mod common;
mod payloads;
mod pg;
mod postgres;
mod sqlite;
