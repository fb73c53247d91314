//! Unit and property tests of the wire codec.
