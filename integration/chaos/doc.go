// Package chaos runs a cluster of real processes (Consul and ukai nodes on
// loopback) under a seeded nemesis while iSCSI clients (qemu-io over
// libiscsi) write and read unique values into small cells of several
// images, records every operation, and checks the whole history with
// package check: no stale read, no value nobody wrote, no acknowledged
// write lost, and at the end every copy holds the final history.
//
// The short form runs in `make test` (fixed seeds); `make chaos SEED=N
// DURATION=10m` runs one long seeded run. docs/testing.md says what the
// nemesis injects, what the checker proves and what it cannot.
package chaos
