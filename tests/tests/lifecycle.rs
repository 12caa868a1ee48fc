//! Lifecycle and faults (issue 4): crash and restart, start race, identity, Docker restart,
//! storm, bad input, interfaces, unload. Each test runs against the real dockerd and outside
//! hosts in network namespaces, through the test-bed library in tests/src.
