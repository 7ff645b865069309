package meta

import (
	"fmt"

	"github.com/ukai-storage/ukai/target/qos"
)

// QoS is an image's I/O limits, part of its record (Image.QoS) so that
// whichever node owns the image reads them with it, and a change reaches
// the owner as any record change does (its doorbell). The owner enforces
// them on the image's iSCSI I/O (target/qos, docs/qos.md). A zero limit
// is no limit; a zero burst is one second's worth of its limit. Bandwidth
// is in bytes per second.
type QoS struct {
	IOPSLimit      int64 `json:"iops_limit,omitempty"`
	ReadIOPSLimit  int64 `json:"read_iops_limit,omitempty"`
	WriteIOPSLimit int64 `json:"write_iops_limit,omitempty"`
	BWLimit        int64 `json:"bw_limit,omitempty"`
	ReadBWLimit    int64 `json:"read_bw_limit,omitempty"`
	WriteBWLimit   int64 `json:"write_bw_limit,omitempty"`

	IOPSBurst      int64 `json:"iops_burst,omitempty"`
	ReadIOPSBurst  int64 `json:"read_iops_burst,omitempty"`
	WriteIOPSBurst int64 `json:"write_iops_burst,omitempty"`
	BWBurst        int64 `json:"bw_burst,omitempty"`
	ReadBWBurst    int64 `json:"read_bw_burst,omitempty"`
	WriteBWBurst   int64 `json:"write_bw_burst,omitempty"`
}

// Limits is q as the limiter takes it (nothing limited for nil).
func (q *QoS) Limits() qos.Limits {
	if q == nil {
		return qos.Limits{}
	}
	return qos.Limits{
		IOPS:      qos.Rate{Limit: q.IOPSLimit, Burst: q.IOPSBurst},
		ReadIOPS:  qos.Rate{Limit: q.ReadIOPSLimit, Burst: q.ReadIOPSBurst},
		WriteIOPS: qos.Rate{Limit: q.WriteIOPSLimit, Burst: q.WriteIOPSBurst},
		BPS:       qos.Rate{Limit: q.BWLimit, Burst: q.BWBurst},
		ReadBPS:   qos.Rate{Limit: q.ReadBWLimit, Burst: q.ReadBWBurst},
		WriteBPS:  qos.Rate{Limit: q.WriteBWLimit, Burst: q.WriteBWBurst},
	}
}

// Zero reports whether q limits nothing.
func (q *QoS) Zero() bool { return q == nil || *q == QoS{} }

// Validate checks q: no negative values, no burst without its limit,
// nothing beyond qos.MaxLimit.
func (q *QoS) Validate() error {
	if q == nil {
		return nil
	}
	if err := q.Limits().Validate(); err != nil {
		return fmt.Errorf("%w: qos: %v", ErrInvalid, err)
	}
	return nil
}
