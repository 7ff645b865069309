package executor

import (
	"context"
	"sync"

	"golang.org/x/time/rate"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// limiters holds the token buckets that cap copy traffic: one per image
// and one per node (shared by all images syncing from or to it).
type limiters struct {
	mu sync.Mutex
	m  map[string]*rate.Limiter
}

// get returns the limiter of key at rate r bytes/s (nil when r is 0:
// unlimited); burst is one block, so over any interval the copied bytes
// stay within one block of r times the interval.
func (l *limiters) get(key string, r int64, burst int64) *rate.Limiter {
	if r <= 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]*rate.Limiter{}
	}
	lim, ok := l.m[key]
	if !ok {
		lim = rate.NewLimiter(rate.Limit(r), int(burst))
		l.m[key] = lim
		return lim
	}
	if lim.Limit() != rate.Limit(r) {
		lim.SetLimit(rate.Limit(r))
	}
	if lim.Burst() < int(burst) {
		lim.SetBurst(int(burst))
	}
	return lim
}

// Pacer waits, after each block copied, until the caps allow its bytes.
// The zero value waits for nothing.
type Pacer []*rate.Limiter

// Wait returns once every cap allows n more bytes (or ctx ends).
func (p Pacer) Wait(ctx context.Context, n int64) error {
	for _, l := range p {
		if l == nil {
			continue
		}
		for left := n; left > 0; {
			k := min(left, int64(l.Burst()))
			if err := l.WaitN(ctx, int(k)); err != nil {
				return err
			}
			left -= k
		}
	}
	return nil
}

// Pacer returns the caps that apply to a sync action: the planner's rate
// for the action (its share of the node caps and the image cap) on the
// image's own bucket, and each node's cap on that node's bucket (the
// destination's, and this node's when it holds a copy it sends from).
func (e *Executor) Pacer(st placement.State, img meta.Image, a placement.Action) Pacer {
	var p Pacer
	p = append(p, e.limits.get("image/"+img.Name, a.Rate, img.BlockSize))
	for node, pol := range st.PerNode {
		if node == a.Node || (len(img.Locations) > 0 && node == e.cfg.Self) {
			p = append(p, e.limits.get("node/"+node, pol.MaxRate, img.BlockSize))
		}
	}
	return p
}

// NodeCap is the cap on this node's copy traffic in bytes/s (0: none)
// as its last plan saw the policies; -1 before its first plan (a node that
// plans no image does not read them).
func (e *Executor) NodeCap() int64 { return e.nodeCap.Load() }
