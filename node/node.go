package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/membership"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/node/admit"
	"github.com/ukai-storage/ukai/node/datadir"
	"github.com/ukai-storage/ukai/node/executor"
	"github.com/ukai-storage/ukai/node/metrics"
	"github.com/ukai-storage/ukai/node/operate"
	"github.com/ukai-storage/ukai/node/reconcile"
	"github.com/ukai-storage/ukai/node/route"
	"github.com/ukai-storage/ukai/node/served"
	"github.com/ukai-storage/ukai/node/trash"
	"github.com/ukai-storage/ukai/ownership"
	"github.com/ukai-storage/ukai/target/iscsi"
	"github.com/ukai-storage/ukai/webui"
)

// Node is one running ukai daemon. The rules it runs live in their own
// packages (ownership: who does an image's I/O; placement: where copies
// go; meta: the catalog and the doorbells it follows); Node wires them to
// the volumes, the portal and the API, and runs their loops (Run), all
// joined before the images and the store close.
//
// Lock order: handoverMu → ownMu → the reconciler's (recon.Do) → the served set's and
// images' locks (package served, leaves). storeMu,
// peersMu, exportsMu, the peer store's locks and an image's
// activity and copy-on-write locks are leaves: nothing is locked while
// one of them is held.
type Node struct {
	cfg     Config
	log     *slog.Logger
	version string
	started time.Time

	kv      meta.KV
	cat     *meta.Catalog
	members *membership.Agent // nil without gossip

	target *iscsi.Server
	// port is this node's target port (and portal group) number, from
	// the store once, then from the data dir (paths.go).
	port   uint16
	apiLn  net.Listener
	apiSrv *http.Server
	dir    *datadir.Dir          // this node's copies and cached records
	recon  *reconcile.Reconciler // the served set in line with the catalog
	router *route.Router         // where each image's I/O runs (here, or its owner)

	images *served.Set // what this node exports, by name and by id

	storeMu sync.Mutex
	storeOK bool // last metadata access succeeded

	ownMu sync.Mutex // one ownership change at a time
	// handoverMu is read-held by each release another node asked for
	// (Release) and write-held by shutdown for good, once it has
	// cancelled life: shutdown waits for those releases before it
	// releases the rest and closes the session, images and store.
	handoverMu sync.RWMutex
	life       context.Context // ends when shutdown begins
	endLife    context.CancelFunc
	peerSrv    *peer.Server
	pstore     *admit.Store // what peers may do to this node's copies
	sec        security
	peersMu    sync.Mutex
	peers      map[string]*peer.Client // by data address

	now           func() time.Time // the clock placement decides by (tests move it)
	clock         ownership.Clock  // the clock ownership decides by (owner.clock_offset)
	session       *ownership.Session
	loops         sync.WaitGroup     // the background loops Run starts; joined before the store closes
	exec          *executor.Executor // placement
	sweeper       *trash.Sweeper     // purges expired trash, removes purged copies
	op            *operate.Operator  // cordon, drain
	syncBytes     atomic.Int64       // bytes copied by syncs since start
	metrics       *metrics.Metrics   // /metrics and iostat
	health        healthProbe        // the last store check of /v1/health
	exportsMu     sync.RWMutex
	exports       map[string][]meta.Export // by image name
	exportsLoaded bool
}

// New opens the node's stores, binds its listeners and joins the cluster;
// nothing is served until Run. Errors name the configuration key at fault.
func New(ctx context.Context, cfg Config, log *slog.Logger, version string) (_ *Node, err error) {
	n := &Node{cfg: cfg, log: log, version: version, started: time.Now(), images: served.NewSet(), storeOK: true, peers: map[string]*peer.Client{}, now: time.Now}
	var closers []func()
	defer func() {
		if err != nil {
			for i := len(closers) - 1; i >= 0; i-- {
				closers[i]()
			}
		}
	}()
	n.metrics = metrics.New(metrics.Config{Node: cfg.Node.Name, Version: version, Source: metricSource{n}, IO: cfg.API.MetricsIO})
	if n.dir, err = datadir.Open(filepath.Join(cfg.Node.DataDir, "images")); err != nil {
		return nil, fmt.Errorf("node.data_dir: %w", err)
	}
	if n.kv, err = openStore(ctx, cfg, log, n.metrics.ConsulTransport); err != nil {
		return nil, err
	}
	closers = append(closers, func() { n.kv.Close() })
	prefix := "ukai/"
	if cfg.Metadata.Backend == "consul" {
		prefix = cfg.Consul.Prefix
	}
	n.cat = meta.NewCatalog(n.kv, prefix)
	n.pstore = admit.New(n.images, n.cat)
	n.life, n.endLife = context.WithCancel(context.Background())
	n.cat.OnMalformed(func(e *meta.MalformedError) { log.Warn("ignoring malformed metadata", "key", e.Key, "err", e.Err) })
	n.clock = offsetClock(cfg.Owner.ClockOffset)
	n.now = n.clock.Now
	n.session = ownership.NewSession(ownership.SessionConfig{
		Store:     n.kv,
		Name:      "ukai:" + cfg.Node.Name,
		TTL:       cfg.Owner.LeaseTTL,
		LockDelay: ownership.LockDelayFor(cfg.Owner.LeaseTTL),
		Path:      filepath.Join(cfg.Node.DataDir, "ownership-session"),
		Clock:     n.clock,
		Log:       log.With("component", "ownership"),
		OnLost:    n.sessionLost,
	})

	n.exec = n.newExecutor()
	n.sweeper = trash.New(trash.Config{Catalog: n.cat, Dir: sweptDir{n}, Self: cfg.Node.Name, Interval: cfg.Trash.Sweep,
		Log: n.log.With("component", "trash")})
	n.op = n.newOperator()
	n.router = route.New(route.Config{Self: cfg.Node.Name, Host: routeHost{n}, Log: log.With("component", "route"), Wait: takeoverWait})
	n.recon = reconcile.New(reconcile.Config{Catalog: n.cat, Self: cfg.Node.Name, Host: reconHost{n}, Log: log.With("component", "reconcile")})
	if n.sec, err = loadSecurity(cfg); err != nil {
		return nil, err
	}
	if n.port, err = n.targetPort(ctx); err != nil {
		return nil, err
	}
	n.loadCachedExports()
	icfg := cfg.ISCSI.iscsiConfig()
	icfg.PortalGroupTag = n.port
	icfg.TargetAddress = cfg.ISCSI.Advertise
	icfg.Logger = log.With("component", "iscsi")
	icfg.Authenticator = iscsi.NewCHAPAuthenticator(iscsi.CHAPConfig{ACL: nodeACL{n}, RequireACL: cfg.ISCSI.RequireACL, Logger: log.With("component", "iscsi-auth"), Discovery: n.sec.discovery})
	n.target, err = iscsi.NewServer(icfg, n)
	if err == nil {
		err = n.target.Listen()
	}
	if err != nil {
		return nil, fmt.Errorf("iscsi.listen %s: %w", cfg.ISCSI.Listen, err)
	}
	closers = append(closers, func() { n.target.Close(context.Background()) })
	if cfg.Peer.Listen != "" {
		n.peerSrv, err = peer.NewServer(peer.ServerConfig{Listen: cfg.Peer.Listen, TLS: n.sec.peerServer, Logger: log.With("component", "peer"), Volumes: n.router, Member: n.isMember, Control: n, Commands: n.router}, n.pstore)
		if err == nil {
			err = n.peerSrv.Listen()
		}
		if err != nil {
			return nil, fmt.Errorf("peer.listen %s: %w", cfg.Peer.Listen, err)
		}
		closers = append(closers, func() { n.peerSrv.Close(context.Background()) })
	}
	n.apiLn, err = net.Listen("tcp", cfg.API.Listen)
	if err != nil {
		return nil, fmt.Errorf("api.listen %s: %w", cfg.API.Listen, err)
	}
	closers = append(closers, func() { n.apiLn.Close() })
	handler := api.NewServerHandler(n, version, log.With("component", "api"), api.Options{
		Token: []byte(n.sec.token), Pprof: cfg.API.Pprof,
		Metrics: n.metrics.Handler(), MetricsPublic: cfg.API.MetricsPublic,
		UI: webui.Handler(),
	})
	n.apiSrv = &http.Server{
		TLSConfig:         n.sec.apiServer,
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
	}
	if cfg.Gossip.Bind != "" {
		if n.members, err = n.joinCluster(ctx); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// ISCSIAddr is the bound iSCSI portal address.
func (n *Node) ISCSIAddr() net.Addr { return n.target.Addr() }

// APIAddr is the bound control API address.
func (n *Node) APIAddr() net.Addr { return n.apiLn.Addr() }

// Run serves until ctx ends, then shuts down: the node leaves the cluster,
// iSCSI sessions are closed, image files synced and closed, the store
// closed.
func (n *Node) Run(ctx context.Context) error {
	// Images this node held when it stopped are served at once from their
	// cached records, even while the metadata store is unreachable; the
	// reconcile loop then brings the set in line with the catalog.
	n.exportCached(ctx)
	// The session outlives the other loops: shutdown releases the owned
	// images with it.
	sessCtx, stopSession := context.WithCancel(context.WithoutCancel(ctx))
	var sessDone sync.WaitGroup
	sessDone.Go(func() { n.session.Run(sessCtx) })
	defer func() { stopSession(); sessDone.Wait() }()
	loopCtx, stopLoops := context.WithCancel(ctx)
	defer stopLoops()
	errc := make(chan error, 3)
	go func() { errc <- n.target.Serve(ctx) }()
	if n.peerSrv != nil {
		go func() { errc <- n.peerSrv.Serve(ctx) }()
	}
	n.loops.Go(func() { n.releaseIdle(loopCtx) })
	n.loops.Go(func() { n.exec.Run(loopCtx) })
	n.loops.Go(func() { n.sweeper.Start(loopCtx); n.sweeper.Wait() })
	go func() {
		serve := func() error { return n.apiSrv.Serve(n.apiLn) }
		if n.sec.apiServer != nil {
			serve = func() error { return n.apiSrv.ServeTLS(n.apiLn, "", "") }
		}
		if err := serve(); !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api: %w", err)
			return
		}
		errc <- nil
	}()
	n.loops.Go(func() { n.watch(loopCtx) })
	n.loops.Go(func() { n.watchExports(loopCtx) })
	if n.members != nil {
		n.loops.Go(func() { n.watchMembers(loopCtx) })
		n.loops.Go(func() { n.refreshMeta(loopCtx) })
		n.loops.Go(func() { n.reconnect(loopCtx) })
	}
	n.log.Info("ukai node serving", "version", n.version, "iscsi", n.target.Addr().String(), "api", n.apiLn.Addr().String(),
		"data_dir", n.cfg.Node.DataDir, "metadata", n.cfg.Metadata.Backend, "gossip", n.cfg.Gossip.Bind)

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		n.log.Error("a listener failed; shutting down", "err", runErr)
	}
	return errors.Join(runErr, n.shutdown(stopLoops))
}

// shutdown stops the node: no new I/O (API, portal), the loops stopped
// and joined, the owned images released (their locks freed at once), the
// session given up, then the images and the store closed.
func (n *Node) shutdown(stopLoops context.CancelFunc) error {
	n.log.Info("shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	// Something that ignores the deadline may never return: say what
	// still runs when the deadline passes, not after (which may be never).
	dump := time.AfterFunc(16*time.Second, func() {
		buf := make([]byte, 4<<20)
		buf = buf[:runtime.Stack(buf, true)]
		n.log.Error("shutdown did not finish within its 15 s; the goroutines still running follow", "stacks", string(buf))
	})
	defer dump.Stop()
	err := n.apiSrv.Shutdown(ctx)
	err = errors.Join(err, n.target.Close(ctx))
	stopLoops()
	n.loops.Wait()
	// Handovers other nodes asked for end (cancelled, they keep the
	// image owned) before the owned images are released below.
	n.endLife()
	n.handoverMu.Lock()
	// Hand back the images this node owns, their copies flushed.
	for _, s := range n.servedImages(true) {
		n.release(ctx, s)
	}
	if cerr := n.session.Close(ctx); cerr != nil {
		n.log.Warn("cannot give up the ownership session; its locks are freed when its TTL runs out", "err", cerr)
	}
	if n.peerSrv != nil {
		err = errors.Join(err, n.peerSrv.Close(ctx))
	}
	if n.members != nil {
		err = errors.Join(err, n.members.Leave(ctx))
	}
	for _, s := range n.images.TakeAll() {
		if cerr := s.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("close image %s: %w", s.Record().Name, cerr))
		}
	}
	err = errors.Join(err, n.kv.Close())
	n.log.Info("stopped", "err", err)
	return err
}

// noteStore logs transitions of metadata store reachability, once each.
func (n *Node) noteStore(err error) {
	n.storeMu.Lock()
	defer n.storeMu.Unlock()
	switch {
	case err == nil && !n.storeOK:
		n.storeOK = true
		n.log.Info("metadata store reachable again")
	case errors.Is(err, meta.ErrUnavailable) && n.storeOK:
		n.storeOK = false
		n.log.Error("metadata store unreachable: serving the images already exported; changes wait until it is back", "err", err)
	}
}

// servedImages returns the exported images, only the owned ones with
// ownedOnly.
func (n *Node) servedImages(ownedOnly bool) []*served.Image {
	return n.images.List(ownedOnly)
}

// every runs fn every d until ctx ends.
func every(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// offsetClock is the system clock shifted by d (owner.clock_offset).
func offsetClock(d time.Duration) ownership.Clock {
	if d == 0 {
		return ownership.SystemClock{}
	}
	return shiftedClock(d)
}

type shiftedClock time.Duration

// Now keeps the monotonic reading (Add does), so durations are unchanged.
func (c shiftedClock) Now() time.Time { return time.Now().Add(time.Duration(c)) }
