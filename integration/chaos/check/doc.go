// Package check decides whether a recorded history of reads and writes of
// cells is linearizable, each cell being an independent read/write register,
// and explains every breach in terms a storage engineer can act on (stale
// read, zeros after a write, lost write, a value nobody wrote).
//
// The method is the zone method of Gibbons and Korach ("Testing shared
// memories", SIAM J. Comput. 1997), which is exact, and runs in O(n log n)
// per register, when every value is written at most once: the chaos clients
// write globally unique values, and value 0 stands for the initial zeros,
// written by a virtual write that completed before the history began.
//
// For each value v of a register, its cluster is its write and the reads
// that returned v. minEnd(v) is the earliest End in the cluster (by then v
// must have taken effect) and maxStart(v) the latest Start (until then v
// must still be current). If minEnd < maxStart, v is current over the whole
// forward zone [minEnd, maxStart]; otherwise its ops can all be linearized
// at any point of the backward zone [maxStart, minEnd]. The history is
// linearizable if and only if no two forward zones overlap and no backward
// zone lies strictly inside another value's forward zone, provided no read
// ended before the write of its value started.
//
// Indeterminate writes (Failed or Timeout) may take effect at any time after
// their Start, or never; giving them End = +inf says exactly that: if read,
// the reads bound them; if never read, their zone reaches +inf and cannot
// breach. Equal times count as concurrent, so a report is never an artefact
// of ties in the clock.
package check
