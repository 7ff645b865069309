// Package scsi emulates a SCSI block device (SBC-3 / SPC-4 subset) on top of
// a Backend. It knows nothing of iSCSI: the transport hands it a Command (CDB
// plus the data the initiator sent) and sends back the Result.
package scsi

import (
	"context"
	"errors"
	"fmt"
)

// SAM status codes.
const (
	StatusGood                = 0x00
	StatusCheckCondition      = 0x02
	StatusConditionMet        = 0x04
	StatusBusy                = 0x08
	StatusReservationConflict = 0x18
	StatusTaskSetFull         = 0x28
)

// Sense keys.
const (
	SenseNoSense        = 0x0
	SenseRecoveredError = 0x1
	SenseNotReady       = 0x2
	SenseMediumError    = 0x3
	SenseHardwareError  = 0x4
	SenseIllegalRequest = 0x5
	SenseUnitAttention  = 0x6
	SenseDataProtect    = 0x7
	SenseAbortedCommand = 0xb
	SenseMiscompare     = 0xe
)

// Backend is the storage behind one logical unit. Offsets and lengths are in
// bytes and always multiples of the logical block size, inside the LU's size.
// Every method may block and must honour ctx. A Backend must be safe for
// concurrent use: several commands (and several sessions) run at once.
//
// An error may be (or wrap) a *SenseError to choose the sense data the
// initiator sees; any other error becomes MEDIUM ERROR (UNRECOVERED READ
// ERROR on reads, WRITE ERROR on writes). An error satisfying
// errors.Is(err, context.Canceled) means the command was abandoned and no
// status is sent.
type Backend interface {
	// ReadAt fills p from byte offset off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. With fua the data is on stable storage
	// (of every copy that counts) before WriteAt returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every write that completed before the call durable.
	Flush(ctx context.Context) error
	// Unmap deallocates [off, off+length): the space is released and
	// later reads of that range return zeros.
	Unmap(ctx context.Context, off, length int64) error
}

// SenseError is an error carrying the sense a failed command reports.
type SenseError struct {
	Key, ASC, ASCQ byte
	Err            error
}

func (e *SenseError) Error() string {
	return fmt.Sprintf("scsi sense %x/%02x/%02x: %v", e.Key, e.ASC, e.ASCQ, e.Err)
}

func (e *SenseError) Unwrap() error { return e.Err }

// AsSense returns the SenseError inside err, if any.
func AsSense(err error) (*SenseError, bool) {
	var se *SenseError
	ok := errors.As(err, &se)
	return se, ok
}

// NexusID names an I_T nexus: the initiator port (initiator name and ISID)
// and the target port. Unit attentions and reservations are kept per nexus.
type NexusID string

// Command is one SCSI command as the transport received it.
type Command struct {
	Nexus NexusID
	LUN   uint64
	CDB   []byte
	// DataOut holds the bytes the initiator sent in the data-out phase
	// (immediate, unsolicited and solicited data together); its length
	// is what the initiator actually transferred, at most ExpectedLen.
	DataOut []byte
	// ExpectedLen is the transport's Expected Data Transfer Length.
	ExpectedLen uint32
	// Read and Write are the direction flags the initiator set.
	Read, Write bool
}

// Result is the outcome of a Command.
type Result struct {
	Status byte
	// Sense is fixed-format sense data (SPC-4 4.5.3) when Status is
	// CHECK CONDITION, else nil.
	Sense []byte
	// DataIn is the data for the initiator; the transport sends at most
	// ExpectedLen bytes of it.
	DataIn []byte
	// TransferLen is the data-phase length in bytes the CDB asked for
	// (allocation length for reads, transfer length for writes); the
	// transport computes residual overflow/underflow from it and the
	// Expected Data Transfer Length.
	TransferLen uint32
	// runRemotely: the backend answered ErrRunRemotely (remote.go).
	runRemotely bool

	release func()
	// Aborted reports that the command was abandoned (its context was
	// cancelled while the Backend worked on it): the transport sends no
	// status for it. Status, Sense and DataIn are then meaningless.
	Aborted bool
}

// Release hands DataIn back to the LU for reuse. The transport calls it
// once, after the data was sent (or dropped); DataIn must not be used
// afterwards. It is a no-op for results without a pooled buffer.
func (r *Result) Release() {
	if r.release != nil {
		r.release()
		r.release = nil
	}
}

// SCSISense returns the sense key and additional sense code (the data
// transport carries it to a forwarding node).
func (e *SenseError) SCSISense() (key, asc, ascq byte) { return e.Key, e.ASC, e.ASCQ }
