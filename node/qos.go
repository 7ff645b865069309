package node

import (
	"context"
	"fmt"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
)

// SetImageQoS implements api.Service: the request merged into the QoS
// limits of the image's record. The owner applies them when the record
// reaches it (its doorbell rings, as for any record change), and a new
// owner reads them with the record.
func (n *Node) SetImageQoS(ctx context.Context, name string, req api.QoSRequest) (api.QoS, error) {
	if err := meta.ValidateName(name); err != nil {
		return api.QoS{}, err
	}
	img, err := n.cat.UpdateImage(ctx, name, func(i *meta.Image) error {
		if i.IsSnapshot() {
			return fmt.Errorf("%w: %s is a snapshot of %s: snapshots are not exported, set limits on %s", meta.ErrInvalid, name, i.Origin.Name, i.Origin.Name)
		}
		q := mergeQoS(i.QoS, req)
		if q.Zero() {
			i.QoS = nil
			return nil
		}
		if err := q.Validate(); err != nil {
			return err
		}
		i.QoS = q
		return nil
	})
	if err != nil {
		return api.QoS{}, err
	}
	if _, err := n.recon.Refresh(ctx, name); err != nil {
		n.log.Debug("applying the QoS change here waits for the next pass", "image", name, "err", err)
	}
	return apiQoS(img.QoS), nil
}

// mergeQoS is old with the fields req gives (a fresh value: records
// share nothing). A limit set to 0 takes its burst with it.
func mergeQoS(old *meta.QoS, req api.QoSRequest) *meta.QoS {
	q := &meta.QoS{}
	if old != nil && !req.Clear {
		*q = *old
	}
	pairs := []struct {
		limit, burst       *int64
		reqLimit, reqBurst *int64
	}{
		{&q.IOPSLimit, &q.IOPSBurst, req.IOPSLimit, req.IOPSBurst},
		{&q.ReadIOPSLimit, &q.ReadIOPSBurst, req.ReadIOPSLimit, req.ReadIOPSBurst},
		{&q.WriteIOPSLimit, &q.WriteIOPSBurst, req.WriteIOPSLimit, req.WriteIOPSBurst},
		{&q.BWLimit, &q.BWBurst, req.BWLimit, req.BWBurst},
		{&q.ReadBWLimit, &q.ReadBWBurst, req.ReadBWLimit, req.ReadBWBurst},
		{&q.WriteBWLimit, &q.WriteBWBurst, req.WriteBWLimit, req.WriteBWBurst},
	}
	for _, p := range pairs {
		if p.reqLimit != nil {
			*p.limit = *p.reqLimit
			if *p.reqLimit == 0 {
				*p.burst = 0
			}
		}
		if p.reqBurst != nil {
			*p.burst = *p.reqBurst
		}
	}
	return q
}

func apiQoS(q *meta.QoS) api.QoS {
	if q == nil {
		return api.QoS{}
	}
	return api.QoS{
		IOPSLimit: q.IOPSLimit, ReadIOPSLimit: q.ReadIOPSLimit, WriteIOPSLimit: q.WriteIOPSLimit,
		BWLimit: q.BWLimit, ReadBWLimit: q.ReadBWLimit, WriteBWLimit: q.WriteBWLimit,
		IOPSBurst: q.IOPSBurst, ReadIOPSBurst: q.ReadIOPSBurst, WriteIOPSBurst: q.WriteIOPSBurst,
		BWBurst: q.BWBurst, ReadBWBurst: q.ReadBWBurst, WriteBWBurst: q.WriteBWBurst,
	}
}

// describeQoS is the image's limits for api.Image (nil: none).
func describeQoS(q *meta.QoS) *api.QoS {
	if q.Zero() {
		return nil
	}
	a := apiQoS(q)
	return &a
}
