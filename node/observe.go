package node

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/node/status"
	"github.com/ukai-storage/ukai/placement"
)

// healthTimeout bounds the metadata store check of Health: a load
// balancer's probe must get an answer, not wait for Consul's.
const healthTimeout = 2 * time.Second

// healthEvery: the store is pinged at most this often for /v1/health,
// which anyone may call; the answers in between are the last result.
const healthEvery = time.Second

// healthProbe is the last store check of Health (guarded by its mutex,
// which also makes concurrent probes wait for one ping).
type healthProbe struct {
	mu  sync.Mutex
	at  time.Time
	err error
}

// Health implements api.Service: this node alone, cheaply. It fails when
// the metadata store does not answer (the node keeps serving what it
// exports, but cannot take images over or change anything), the node is
// shutting down, or its portal is not listening. The details say which,
// never an address or an error's text: the endpoint is open.
func (n *Node) Health(ctx context.Context) api.Health {
	h := api.Health{Node: n.cfg.Node.Name, Status: "ok"}
	add := func(name string, ok bool, detail string) {
		c := api.HealthCheck{Name: name, OK: ok}
		if !ok {
			c.Detail = detail
			h.Status = "failing"
		}
		h.Checks = append(h.Checks, c)
	}
	add("running", n.life.Err() == nil, "shutting down")
	p := &n.health
	p.mu.Lock()
	if time.Since(p.at) >= healthEvery {
		// Not the caller's context: a prober that hung up must not make
		// the node look failing to the next ones.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), healthTimeout)
		p.err = n.kv.Ping(cctx)
		cancel()
		p.at = time.Now()
		if p.err != nil {
			n.log.Warn("health: metadata store check failed", "err", p.err)
		}
	}
	err := p.err
	p.mu.Unlock()
	add("metadata", err == nil, "the metadata store does not answer")
	add("iscsi", n.target.Addr() != nil, "the iSCSI portal is not listening")
	return h
}

// IOStat implements api.Service.
func (n *Node) IOStat(context.Context) (api.IOStat, error) {
	out := api.IOStat{Node: n.cfg.Node.Name, Time: time.Now(), Counting: n.metrics.IOEnabled(), Images: []api.ImageIO{}}
	for _, c := range n.metrics.IOStat() {
		io := api.ImageIO{Image: c.Image, ReadOps: c.ReadOps, WriteOps: c.WriteOps, ReadBytes: c.ReadBytes, WriteBytes: c.WriteBytes,
			ReadNanos: c.ReadNanos, WriteNanos: c.WriteNanos, Errors: c.Errors}
		if s := n.images.Get(c.Image); s != nil {
			io.Owner = s.Record().Owner
		}
		out.Images = append(out.Images, io)
	}
	sort.Slice(out.Images, func(i, j int) bool { return out.Images[i].Image < out.Images[j].Image })
	return out, nil
}

// Status implements api.Service: it reads every image's record, policy
// and block maps (like `image list`), so it costs a few store reads per
// image; it is for operators, not for polling (see Health and /metrics).
func (n *Node) Status(ctx context.Context) (api.ClusterStatus, error) {
	nodes, err := n.ListNodes(ctx)
	if err != nil {
		return api.ClusterStatus{}, err
	}
	def, perNode, _, _, err := n.cat.SyncPolicies(ctx)
	if err != nil {
		return api.ClusterStatus{}, err
	}
	var sn []status.Node
	alive := map[string]bool{}
	for _, m := range nodes {
		var d placement.SyncPolicy
		if def != nil {
			d = *def
		}
		c := placement.NodeCap(perNode, d, m.Name, false)
		sn = append(sn, status.Node{Name: m.Name, State: m.State, Cordoned: m.Cordoned, Draining: m.Draining, Cap: c})
		alive[m.Name] = m.State == "alive" || m.State == "suspect"
	}
	imgs, _, bad, err := n.cat.ListImages(ctx)
	if err != nil {
		return api.ClusterStatus{}, err
	}
	var unreadable []string
	for _, b := range bad {
		unreadable = append(unreadable, b.Error())
	}
	var si []status.Image
	for _, img := range imgs {
		x := status.Image{Name: img.Name, Snapshot: img.IsSnapshot(), Owner: img.Owner, Attached: img.Attached,
			BlockSize: img.BlockSize, Wanted: len(img.Locations), SyncPaused: img.SyncPaused}
		if x.Snapshot {
			si = append(si, x)
			continue
		}
		img, maps, err := n.cat.LocationMaps(ctx, img)
		if err != nil {
			unreadable = append(unreadable, err.Error())
			continue
		}
		x.Owner, x.Attached, x.Wanted, x.SyncPaused = img.Owner, img.Attached, len(img.Locations), img.SyncPaused
		if pol, _, err := n.cat.ImagePolicy(ctx, img.Name); err == nil && pol.Replicas > 0 {
			x.Wanted = pol.Replicas
		}
		var live []*placement.BlockMap
		for _, loc := range img.Locations {
			bm := maps[loc]
			x.Locations = append(x.Locations, status.Location{Node: loc, OutOfSync: bm.Count(placement.OutOfSync), Syncing: bm.Count(placement.Syncing)})
			if alive[loc] {
				live = append(live, bm)
			}
		}
		x.Unprotected = placement.Unprotected(img.Blocks(), live)
		si = append(si, x)
	}
	return status.Summarize(n.cfg.Node.Name, time.Now(), sn, si, unreadable), nil
}

// SetMetricsIO turns the counting of image I/O on or off (a reload of
// api.metrics_io).
func (n *Node) SetMetricsIO(on bool) { n.metrics.SetIO(on) }
