//go:build ukai_broken

package lun

import "sync/atomic"

// A deliberately broken build, for one test only: every 40th 4 KiB write
// to a copy is acknowledged without being stored (the defect a lying disk
// or a lost write would cause). integration/chaos builds ukai with
// -tags ukai_broken to prove that its checker catches such a copy
// (TestChaosCatchesBrokenCopy). No other build sets the tag.
var brokenWrites atomic.Uint64

func dropWrite(n int) bool { return n == 4096 && brokenWrites.Add(1)%40 == 0 }
