// Package metrics is what a node tells Prometheus: the I/O of the images
// its initiators use, the state of the images it is responsible for, its
// peers, its metadata store and its planner.
//
// Two kinds of series, to keep a scrape cheap and the cluster's series
// count proportional to images, not to nodes x images:
//
//   - I/O counters and latency histograms are kept by the node the
//     initiator's session is on (the front), for the images that saw I/O
//     there since the node started (created on the first command, dropped
//     when the image is withdrawn). An idle node exports none.
//   - An image's state (owner, out-of-sync blocks per location, blocks
//     without an in-sync copy) is reported by exactly one node: the one
//     that plans it (its owner, or its first live location when nobody
//     owns it), through Source at scrape time.
//
// The package holds no global state: each Metrics has its own registry.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Source is what the node reports at scrape time. Its methods must be
// cheap (no metadata store request): they run on every scrape.
type Source interface {
	// Images are the images this node is responsible for reporting.
	Images() []ImageState
	// Peers are the peer clients this node has.
	Peers() []PeerStats
	// Node is the node's own state.
	Node() NodeStats
}

// ImageState is one image as its responsible node sees it.
type ImageState struct {
	Name      string
	Owner     string // "" when nobody owns it
	Attached  string
	Size      int64
	BlockSize int64
	Locations []LocationState
	// Unprotected counts the blocks without an in-sync copy on a live
	// location: their data cannot be read now.
	Unprotected int64
	// Wanted is the number of copies the image should have.
	Wanted int
	// Known: the block counts are known (an owned image's live maps, or
	// a plan here); without, only the image's info, size, copies and
	// locations' liveness are reported, never a guess of 0.
	Known bool
}

// LocationState is one copy of an image.
type LocationState struct {
	Node      string
	Alive     bool
	OutOfSync int64 // blocks
	Syncing   int64 // blocks
	// Unknown: the counts of this copy are not known (its node is dead
	// and nobody plans the image): no out-of-sync series for it.
	Unknown bool
}

// PeerStats is one peer client's counters.
type PeerStats struct {
	Peer                 string // node name (its address when unknown)
	RTT                  time.Duration
	Requests, Errors     int64
	SentBytes, RecvBytes int64
}

// NodeStats is the node's own state.
type NodeStats struct {
	Sessions      int
	Served, Owned int
	// Members counts the membership by state (alive, suspect, dead,
	// left), as this node sees it.
	Members         map[string]int
	PlannerRounds   int64
	PlannerActions  map[string]int64 // actions started, by kind
	Settled         int
	SyncBytes       int64
	SyncCap         int64 // this node's copy cap in bytes/s, 0: none, -1: not known yet
	PeerBytesIn     int64 // block data other nodes wrote to this node's copies
	PeerBytesOut    int64 // block data other nodes read from this node's copies
	StoreOK         bool  // the last metadata access succeeded
	SessionRenewals int64 // ownership session renewals that succeeded
}

// Config is what New needs.
type Config struct {
	Node, Version string
	Source        Source
	// IO counts each image's I/O (on by default in the node's config;
	// the bench measures its cost against off).
	IO bool
}

// Metrics is one node's registry and the I/O counters it feeds.
type Metrics struct {
	cfg Config
	reg *prometheus.Registry
	io  atomic.Bool // count image I/O (Config.IO, changed by SetIO)

	mu     sync.Mutex
	images map[string]*ImageIO
	synced map[string]*atomic.Int64 // sync bytes by image

	consulReqs *prometheus.CounterVec
	consulDur  *prometheus.HistogramVec
}

// LatencyBuckets are the buckets of the I/O latency histograms, in
// seconds: 50 µs (a 4 KiB write to a local SSD copy) to 5 s (a copy's
// timeout), about x2.5 apart, 12 buckets so a histogram is 15 series.
var LatencyBuckets = []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 5}

// New returns the metrics of one node.
func New(cfg Config) *Metrics {
	m := &Metrics{cfg: cfg, reg: prometheus.NewRegistry(), images: map[string]*ImageIO{}, synced: map[string]*atomic.Int64{}}
	m.io.Store(cfg.IO)
	m.consulReqs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ukai_consul_requests_total",
		Help: "Requests to the Consul agent, by endpoint (kv, txn, session/renew, ...) and result (HTTP status code, or error).",
	}, []string{"endpoint", "code"})
	m.consulDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ukai_consul_request_duration_seconds",
		Help:    "Latency of non-blocking requests to the Consul agent, by endpoint.",
		Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5},
	}, []string{"endpoint"})
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.consulReqs, m.consulDur,
		collector{m},
	)
	return m
}

// Registry is the node's registry (tests gather from it).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// IOEnabled says whether image I/O is counted.
func (m *Metrics) IOEnabled() bool { return m != nil && m.io.Load() }

// SetIO turns the counting of image I/O on or off, at once for every
// image (a reload of api.metrics_io). Counters keep their values.
func (m *Metrics) SetIO(on bool) { m.io.Store(on) }

// image returns the counters of an image, creating them.
func (m *Metrics) image(name string) *ImageIO {
	m.mu.Lock()
	defer m.mu.Unlock()
	io := m.images[name]
	if io == nil {
		io = newImageIO(name)
		m.images[name] = io
	}
	return io
}

// Forget drops an image's series (it is no longer served here).
func (m *Metrics) Forget(name string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	delete(m.images, name)
	delete(m.synced, name)
	m.mu.Unlock()
}

// Synced counts n bytes copied by a sync of image (the sync rate is its
// rate()).
func (m *Metrics) Synced(image string, n int64) {
	if m == nil {
		return
	}
	m.mu.Lock()
	c := m.synced[image]
	if c == nil {
		c = &atomic.Int64{}
		m.synced[image] = c
	}
	m.mu.Unlock()
	c.Add(n)
}

// IOCounters are one image's I/O counters since the node started.
type IOCounters struct {
	Image                 string
	ReadOps, WriteOps     int64
	ReadBytes, WriteBytes int64
	ReadNanos, WriteNanos int64 // summed latency
	FlushOps, UnmapOps    int64
	Errors                int64
	SyncBytes             int64
}

// IOStat returns the counters of every image that saw I/O here.
func (m *Metrics) IOStat() []IOCounters {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	ios := make([]*ImageIO, 0, len(m.images))
	for _, io := range m.images {
		ios = append(ios, io)
	}
	m.mu.Unlock()
	out := make([]IOCounters, 0, len(ios))
	for _, io := range ios {
		out = append(out, io.counters())
	}
	return out
}

// collector turns the I/O counters and the Source into series at scrape
// time.
type collector struct{ m *Metrics }

// Describe sends nothing: the collector is unchecked, its series come and
// go with images and peers.
func (collector) Describe(chan<- *prometheus.Desc) {}

var (
	descNodeInfo   = prometheus.NewDesc("ukai_node_info", "Always 1; the node's name and ukai version as labels.", []string{"node", "version"}, nil)
	descSessions   = prometheus.NewDesc("ukai_node_iscsi_sessions", "iSCSI sessions (not discovery) on the node.", nil, nil)
	descServed     = prometheus.NewDesc("ukai_node_images_served", "Images the node exports.", nil, nil)
	descOwned      = prometheus.NewDesc("ukai_node_images_owned", "Images the node owns (serves their I/O).", nil, nil)
	descMembers    = prometheus.NewDesc("ukai_membership_nodes", "Nodes of the membership as this node sees them, by state.", []string{"state"}, nil)
	descRounds     = prometheus.NewDesc("ukai_planner_rounds_total", "Planning rounds of the node's executor.", nil, nil)
	descActions    = prometheus.NewDesc("ukai_planner_actions_total", "Planner actions the node started, by kind (add_location, remove_location, sync, set_replicas).", []string{"action"}, nil)
	descSettled    = prometheus.NewDesc("ukai_planner_images_settled", "Images whose last plan here found nothing to do.", nil, nil)
	descSyncBytes  = prometheus.NewDesc("ukai_node_sync_bytes_total", "Bytes the node copied while synchronizing.", nil, nil)
	descSyncCap    = prometheus.NewDesc("ukai_node_sync_cap_bytes_per_second", "The node's cap on copy traffic as its last plan saw the policies (0: none); rate(ukai_node_sync_bytes_total) over it is the cap's usage.", nil, nil)
	descPeerIn     = prometheus.NewDesc("ukai_node_peer_written_bytes_total", "Block data other nodes wrote to this node's copies.", nil, nil)
	descPeerOut    = prometheus.NewDesc("ukai_node_peer_read_bytes_total", "Block data other nodes read from this node's copies.", nil, nil)
	descCounting   = prometheus.NewDesc("ukai_node_image_io_counting", "1 when the node counts image I/O (api.metrics_io); 0: the ukai_image_* I/O series are frozen, not idle.", nil, nil)
	descStoreUp    = prometheus.NewDesc("ukai_node_metadata_up", "1 when the node's last metadata store access succeeded.", nil, nil)
	descRenewals   = prometheus.NewDesc("ukai_ownership_session_renewals_total", "Renewals of the node's ownership session that succeeded.", nil, nil)
	descPeerRTT    = prometheus.NewDesc("ukai_peer_rtt_seconds", "Smoothed round-trip time of small requests to a peer.", []string{"peer"}, nil)
	descPeerReqs   = prometheus.NewDesc("ukai_peer_requests_total", "Requests to a peer.", []string{"peer"}, nil)
	descPeerErrs   = prometheus.NewDesc("ukai_peer_request_errors_total", "Requests to a peer that failed (transport or status).", []string{"peer"}, nil)
	descPeerSent   = prometheus.NewDesc("ukai_peer_sent_bytes_total", "Block data sent to a peer.", []string{"peer"}, nil)
	descPeerRecv   = prometheus.NewDesc("ukai_peer_received_bytes_total", "Block data received from a peer.", []string{"peer"}, nil)
	descImageInfo  = prometheus.NewDesc("ukai_image_info", "Always 1; the image's owner and the node it is attached to as labels (empty: none).", []string{"image", "owner", "attached"}, nil)
	descImageSize  = prometheus.NewDesc("ukai_image_size_bytes", "The image's size.", []string{"image"}, nil)
	descCopies     = prometheus.NewDesc("ukai_image_copies", "Locations (copies) of the image.", []string{"image"}, nil)
	descWanted     = prometheus.NewDesc("ukai_image_wanted_copies", "Copies the image should have (its replica count, else its locations).", []string{"image"}, nil)
	descInSync     = prometheus.NewDesc("ukai_image_in_sync_copies", "Copies on live nodes with every block in sync.", []string{"image"}, nil)
	descUnprot     = prometheus.NewDesc("ukai_image_blocks_without_in_sync_copy", "Blocks without an in-sync copy on a live node: their data cannot be read now.", []string{"image"}, nil)
	descOOSBytes   = prometheus.NewDesc("ukai_image_out_of_sync_bytes", "Bytes of a location's copy that are out of sync.", []string{"image", "location"}, nil)
	descSyncing    = prometheus.NewDesc("ukai_image_syncing_bytes", "Bytes of a location's copy being synchronized now.", []string{"image", "location"}, nil)
	descLocUp      = prometheus.NewDesc("ukai_image_location_up", "1 when the location's node is alive.", []string{"image", "location"}, nil)
	descReadOps    = prometheus.NewDesc("ukai_image_read_ops_total", "Read commands of the image through this node.", []string{"image"}, nil)
	descWriteOps   = prometheus.NewDesc("ukai_image_write_ops_total", "Write commands of the image through this node.", []string{"image"}, nil)
	descFlushOps   = prometheus.NewDesc("ukai_image_flush_ops_total", "Flush (SYNCHRONIZE CACHE) commands of the image through this node.", []string{"image"}, nil)
	descUnmapOps   = prometheus.NewDesc("ukai_image_unmap_ops_total", "Unmap and write-same-unmap commands of the image through this node.", []string{"image"}, nil)
	descReadBytes  = prometheus.NewDesc("ukai_image_read_bytes_total", "Bytes read from the image through this node.", []string{"image"}, nil)
	descWriteBytes = prometheus.NewDesc("ukai_image_write_bytes_total", "Bytes written to the image through this node.", []string{"image"}, nil)
	descErrors     = prometheus.NewDesc("ukai_image_io_errors_total", "Failed commands of the image through this node, by operation and SCSI sense key.", []string{"image", "op", "sense_key"}, nil)
	descImgSync    = prometheus.NewDesc("ukai_image_sync_bytes_total", "Bytes this node copied while synchronizing the image.", []string{"image"}, nil)
)

func (c collector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	gauge(descNodeInfo, 1, m.cfg.Node, m.cfg.Version)
	gauge(descCounting, b2f(m.io.Load()))
	if m.cfg.Source != nil {
		ns := m.cfg.Source.Node()
		gauge(descSessions, float64(ns.Sessions))
		gauge(descServed, float64(ns.Served))
		gauge(descOwned, float64(ns.Owned))
		for _, st := range []string{"alive", "suspect", "dead", "left"} {
			gauge(descMembers, float64(ns.Members[st]), st)
		}
		counter(descRounds, float64(ns.PlannerRounds))
		for kind, n := range ns.PlannerActions {
			counter(descActions, float64(n), kind)
		}
		gauge(descSettled, float64(ns.Settled))
		counter(descSyncBytes, float64(ns.SyncBytes))
		if ns.SyncCap >= 0 {
			gauge(descSyncCap, float64(ns.SyncCap))
		}
		counter(descPeerIn, float64(ns.PeerBytesIn))
		counter(descPeerOut, float64(ns.PeerBytesOut))
		gauge(descStoreUp, b2f(ns.StoreOK))
		counter(descRenewals, float64(ns.SessionRenewals))
		for _, p := range m.cfg.Source.Peers() {
			gauge(descPeerRTT, p.RTT.Seconds(), p.Peer)
			counter(descPeerReqs, float64(p.Requests), p.Peer)
			counter(descPeerErrs, float64(p.Errors), p.Peer)
			counter(descPeerSent, float64(p.SentBytes), p.Peer)
			counter(descPeerRecv, float64(p.RecvBytes), p.Peer)
		}
		for _, img := range m.cfg.Source.Images() {
			gauge(descImageInfo, 1, img.Name, img.Owner, img.Attached)
			gauge(descImageSize, float64(img.Size), img.Name)
			gauge(descCopies, float64(len(img.Locations)), img.Name)
			gauge(descWanted, float64(img.Wanted), img.Name)
			inSync := 0
			for _, l := range img.Locations {
				gauge(descLocUp, b2f(l.Alive), img.Name, l.Node)
				if !img.Known || l.Unknown {
					continue
				}
				if l.Alive && l.OutOfSync == 0 && l.Syncing == 0 {
					inSync++
				}
				gauge(descOOSBytes, float64(l.OutOfSync*img.BlockSize), img.Name, l.Node)
				gauge(descSyncing, float64(l.Syncing*img.BlockSize), img.Name, l.Node)
			}
			if img.Known {
				gauge(descInSync, float64(inSync), img.Name)
				gauge(descUnprot, float64(img.Unprotected), img.Name)
			}
		}
	}
	m.mu.Lock()
	ios := make([]*ImageIO, 0, len(m.images))
	for _, io := range m.images {
		ios = append(ios, io)
	}
	synced := make(map[string]int64, len(m.synced))
	for name, c := range m.synced {
		synced[name] = c.Load()
	}
	m.mu.Unlock()
	for _, io := range ios {
		io.collect(ch, counter)
	}
	for name, n := range synced {
		counter(descImgSync, float64(n), name)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// ConsulTransport wraps the transport of the Consul client: each request
// is counted by endpoint and result, and timed unless it is a blocking
// query (a watch waits by design).
func (m *Metrics) ConsulTransport(next http.RoundTripper) http.RoundTripper {
	return roundTripper(func(r *http.Request) (*http.Response, error) {
		ep := consulEndpoint(r)
		start := time.Now()
		resp, err := next.RoundTrip(r)
		code := "error"
		if err == nil {
			code = strconv.Itoa(resp.StatusCode)
		}
		m.consulReqs.WithLabelValues(ep, code).Inc()
		if ep != "kv/watch" {
			m.consulDur.WithLabelValues(ep).Observe(time.Since(start).Seconds())
		}
		return resp, err
	})
}

type roundTripper func(*http.Request) (*http.Response, error)

func (f roundTripper) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// consulEndpoint names a Consul API request by its kind, never by key
// (keys hold image names: the label stays bounded).
func consulEndpoint(r *http.Request) string {
	p := r.URL.Path
	switch {
	case hasPrefix(p, "/v1/kv/"):
		if r.URL.Query().Has("index") {
			return "kv/watch"
		}
		return "kv"
	case hasPrefix(p, "/v1/txn"):
		return "txn"
	case hasPrefix(p, "/v1/session/renew/"):
		return "session/renew"
	case hasPrefix(p, "/v1/session/create"):
		return "session/create"
	case hasPrefix(p, "/v1/session/destroy/"):
		return "session/destroy"
	case hasPrefix(p, "/v1/session/"):
		return "session/other"
	case hasPrefix(p, "/v1/status/"):
		return "status"
	}
	return "other"
}

func hasPrefix(s, p string) bool { return len(s) >= len(p) && s[:len(p)] == p }
