package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"strconv"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// Service is what the API serves; the node implements it. Errors wrapping
// meta.ErrInvalid, meta.ErrImageNotFound (and ErrNodeNotFound,
// ErrExportNotFound), meta.ErrImageExists,
// meta.ErrConflict and meta.ErrUnavailable map to 400, 404, 409, 409 and
// 503; anything else is a 500.
type Service interface {
	CreateImage(ctx context.Context, req CreateImageRequest) (Image, error)
	// CopyImage creates an image from req.Source (a clone or a copy of a
	// snapshot) like CreateImage, calling progress as the data is copied.
	CopyImage(ctx context.Context, req CreateImageRequest, progress func(CopyProgress)) (Image, error)
	ListImages(ctx context.Context) (ImageList, error)
	GetImage(ctx context.Context, name string, blocks BlockView) (Image, error)
	// DeleteImage moves the image to the trash (now: deletes it at once).
	DeleteImage(ctx context.Context, name string, now bool) error
	ListTrash(ctx context.Context) ([]TrashEntry, error)
	// RestoreTrash brings an image back from the trash (ref: its id, or
	// its name when one entry has it) under name (its own when empty).
	RestoreTrash(ctx context.Context, ref, name string) (Image, error)
	PurgeTrash(ctx context.Context, ref string) error
	NodeInfo(ctx context.Context) (Node, error)
	ListNodes(ctx context.Context) ([]Node, error)
	GetNode(ctx context.Context, name string) (Node, error)
	AddLocation(ctx context.Context, image, node string) (Image, error)
	RemoveLocation(ctx context.Context, image, node string) (Image, error)
	// SyncImage calls progress with each progress line (and the final
	// summary) before it returns.
	SyncImage(ctx context.Context, image string, req SyncRequest, progress func(SyncProgress)) error
	VerifyImage(ctx context.Context, image string) (VerifyResult, error)
	SetImagePolicy(ctx context.Context, image string, req ImagePolicyRequest) (ImagePolicy, error)
	// SetImageQoS changes the image's QoS limits (api/qos.go).
	SetImageQoS(ctx context.Context, image string, req QoSRequest) (QoS, error)
	Relocate(ctx context.Context, image string, req RelocateRequest) (ImagePolicy, error)
	PlanImage(ctx context.Context, image string) ([]Action, error)
	SetSyncPolicy(ctx context.Context, req SyncPolicyRequest) error
	SyncPolicies(ctx context.Context) (SyncPolicies, error)
	Stats(ctx context.Context) (Stats, error)
	Attach(ctx context.Context, image, node string) (Image, error)
	Detach(ctx context.Context, image string) (Image, error)
	Export(ctx context.Context, image string, req ExportRequest) error
	Unexport(ctx context.Context, image, initiator string) error
	CreateSnapshot(ctx context.Context, image string, req SnapshotRequest) (Snapshot, error)
	ListSnapshots(ctx context.Context, image string, all bool) ([]Snapshot, error)
	RevertSnapshot(ctx context.Context, image, snapshot string) (Image, error)
	DeleteSnapshot(ctx context.Context, image, snapshot string) error
	ResizeImage(ctx context.Context, image string, size int64) (Image, error)
	// ReadData streams the whole image (or snapshot) to w; it calls start
	// with the size before the first byte.
	ReadData(ctx context.Context, image string, start func(size int64), w io.Writer) error
	// ReadDiff streams the changes from image's snapshot from to snapshot
	// name (IMAGE@SNAP; from empty: all its data) in the format of
	// package diffstream; it calls start before the first byte.
	ReadDiff(ctx context.Context, name, from string, start func(), w io.Writer) error
	// WriteDiff applies such a stream to image name.
	WriteDiff(ctx context.Context, name string, r io.Reader, opts DiffOptions) (DiffApplied, error)
	// WriteData writes r from the image's start (at most its size).
	WriteData(ctx context.Context, image string, r io.Reader) (int64, error)
	// CordonNode cordons (or uncordons, which also stops a drain) a node.
	CordonNode(ctx context.Context, node string, req CordonRequest) (NodeOperation, error)
	DrainNode(ctx context.Context, node string, req DrainRequest) (NodeOperation, error)
	NodeOperation(ctx context.Context, node string) (NodeOperation, error)
	SetGroup(ctx context.Context, g Group) (Group, error)
	Groups(ctx context.Context) ([]Group, error)
	DeleteGroup(ctx context.Context, name string) error
	// Health checks this node only; it must be cheap (load balancers
	// poll it).
	Health(ctx context.Context) Health
	Status(ctx context.Context) (ClusterStatus, error)
	IOStat(ctx context.Context) (IOStat, error)
}

// maxBody bounds request bodies.
const maxBody = 1 << 20

// NewHandler returns the HTTP handler of the API over svc.
func NewHandler(svc Service, version string, log *slog.Logger) http.Handler {
	h := &handler{svc: svc, log: log, version: version}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/version", h.getVersion)
	mux.HandleFunc("GET /v1/node", h.getSelf)
	mux.HandleFunc("GET /v1/nodes", h.listNodes)
	mux.HandleFunc("GET /v1/nodes/{name}", h.getNode)
	mux.HandleFunc("PUT /v1/nodes/{name}/cordon", h.cordon)
	mux.HandleFunc("POST /v1/nodes/{name}/drain", h.drain)
	mux.HandleFunc("GET /v1/nodes/{name}/drain", h.drainStatus)
	mux.HandleFunc("GET /v1/groups", h.groups)
	mux.HandleFunc("PUT /v1/groups/{name}", h.setGroup)
	mux.HandleFunc("DELETE /v1/groups/{name}", h.deleteGroup)
	mux.HandleFunc("GET /v1/images", h.listImages)
	mux.HandleFunc("POST /v1/images", h.createImage)
	mux.HandleFunc("GET /v1/images/{name}", h.getImage)
	mux.HandleFunc("DELETE /v1/images/{name}", h.deleteImage)
	mux.HandleFunc("GET /v1/trash", h.listTrash)
	mux.HandleFunc("POST /v1/trash/{ref}/restore", h.restoreTrash)
	mux.HandleFunc("DELETE /v1/trash/{ref}", h.purgeTrash)
	mux.HandleFunc("POST /v1/images/{name}/locations", h.addLocation)
	mux.HandleFunc("DELETE /v1/images/{name}/locations/{node}", h.removeLocation)
	mux.HandleFunc("POST /v1/images/{name}/sync", h.syncImage)
	mux.HandleFunc("POST /v1/images/{name}/verify", h.verifyImage)
	mux.HandleFunc("PUT /v1/images/{name}/policy", h.setImagePolicy)
	mux.HandleFunc("PUT /v1/images/{name}/qos", h.setImageQoS)
	mux.HandleFunc("POST /v1/images/{name}/relocate", h.relocate)
	mux.HandleFunc("GET /v1/images/{name}/plan", h.plan)
	mux.HandleFunc("PUT /v1/policies/sync", h.setSyncPolicy)
	mux.HandleFunc("GET /v1/policies/sync", h.syncPolicies)
	mux.HandleFunc("GET /v1/stats", h.stats)
	mux.HandleFunc("GET /v1/status", h.status)
	mux.HandleFunc("GET /v1/iostat", h.iostat)
	mux.HandleFunc("GET "+HealthPath, h.health) // GET also answers HEAD
	mux.HandleFunc("POST /v1/images/{name}/attach", h.attach)
	mux.HandleFunc("POST /v1/images/{name}/exports", h.export)
	mux.HandleFunc("DELETE /v1/images/{name}/exports/{initiator}", h.unexport)
	mux.HandleFunc("POST /v1/images/{name}/detach", h.detach)
	mux.HandleFunc("POST /v1/images/{name}/snapshots", h.createSnapshot)
	mux.HandleFunc("GET /v1/images/{name}/snapshots", h.listSnapshots)
	mux.HandleFunc("DELETE /v1/images/{name}/snapshots/{snapshot}", h.deleteSnapshot)
	mux.HandleFunc("POST /v1/images/{name}/snapshots/{snapshot}/revert", h.revertSnapshot)
	mux.HandleFunc("POST /v1/images/{name}/resize", h.resize)
	mux.HandleFunc("GET /v1/images/{name}/data", h.readData)
	mux.HandleFunc("GET /v1/images/{name}/diff", h.readDiff)
	mux.HandleFunc("PUT /v1/images/{name}/diff", h.writeDiff)
	mux.HandleFunc("PUT /v1/images/{name}/data", h.writeData)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Errorf("no such API endpoint: %s %s", r.Method, r.URL.Path))
	})
	return h.logged(mux)
}

// Options is what a node's API serves besides NewHandler's endpoints.
type Options struct {
	// Token, when not empty, is required on every request (RequireToken):
	// the profiler's too.
	Token []byte
	// Pprof adds Go's profiler under /debug/pprof/. It sits behind the
	// token like everything else: heap and goroutine dumps show memory
	// contents, and a CPU profile or trace runs as long as the caller
	// asks.
	Pprof bool
	// Metrics, when set, is served at /metrics: behind the token unless
	// MetricsPublic.
	Metrics       http.Handler
	MetricsPublic bool
	// UI, when set, is served under /ui/ (behind the token, which a
	// browser carries in a cookie: see RequireToken).
	UI http.Handler
}

// NewServerHandler returns the handler a node serves: NewHandler over svc,
// with the profiler when o.Pprof, the whole behind RequireToken when
// o.Token is set.
func NewServerHandler(svc Service, version string, log *slog.Logger, o Options) http.Handler {
	h := NewHandler(svc, version, log)
	mux := http.NewServeMux()
	if o.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	if o.Metrics != nil && !(o.MetricsPublic && len(o.Token) > 0) {
		mux.Handle("GET /metrics", o.Metrics)
	}
	if o.UI != nil {
		mux.Handle("GET /ui/", o.UI)
		mux.Handle("GET /ui", http.RedirectHandler("/ui/", http.StatusMovedPermanently))
	}
	mux.Handle("/", h)
	var out http.Handler = mux
	if len(o.Token) > 0 {
		out = RequireToken(mux, o.Token)
		if o.Metrics != nil && o.MetricsPublic {
			open := http.NewServeMux()
			open.Handle("GET /metrics", o.Metrics)
			open.Handle("/", out)
			out = open
		}
	}
	return out
}

type handler struct {
	svc     Service
	log     *slog.Logger
	version string
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(s int) { w.status = s; w.ResponseWriter.WriteHeader(s) }

// Flush passes flushes through: the progress streams (sync, copy) must
// reach the client line by line, not when net/http's buffer fills.
func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the connection's writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (h *handler) logged(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(sw, r)
		lvl := slog.LevelDebug
		if sw.status >= 500 {
			lvl = slog.LevelWarn
		}
		h.log.Log(r.Context(), lvl, "api request", "method", r.Method, "path", r.URL.Path, "status", sw.status, "duration", time.Since(start))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, Error{Error: err.Error()})
}

// StatusOf maps a service error to its HTTP status.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, meta.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, meta.ErrImageNotFound), errors.Is(err, meta.ErrTrashNotFound), errors.Is(err, meta.ErrNodeNotFound), errors.Is(err, meta.ErrExportNotFound), errors.Is(err, meta.ErrGroupNotFound):
		return http.StatusNotFound
	case errors.Is(err, meta.ErrImageExists), errors.Is(err, meta.ErrConflict), errors.Is(err, meta.ErrLastCopy), errors.Is(err, meta.ErrRefused):
		return http.StatusConflict
	case errors.Is(err, meta.ErrUnavailable):
		return http.StatusServiceUnavailable
	}
	// Another node's answer, forwarded: its status stands.
	var se *StatusError
	if errors.As(err, &se) && se.Status >= 400 && se.Status < 600 {
		return se.Status
	}
	return http.StatusInternalServerError
}

func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	st := StatusOf(err)
	if st >= 500 {
		h.log.Warn("api request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeError(w, st, err)
}

func (h *handler) getVersion(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, Version{Version: h.version, API: "v1"})
}

func (h *handler) getSelf(w http.ResponseWriter, r *http.Request) {
	n, err := h.svc.NodeInfo(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, n)
}

func (h *handler) listNodes(w http.ResponseWriter, r *http.Request) {
	ns, err := h.svc.ListNodes(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]Node{"nodes": ns})
}

func (h *handler) getNode(w http.ResponseWriter, r *http.Request) {
	n, err := h.svc.GetNode(r.Context(), r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, n)
}

func (h *handler) listImages(w http.ResponseWriter, r *http.Request) {
	l, err := h.svc.ListImages(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if l.Images == nil {
		l.Images = []Image{}
	}
	writeJSON(w, http.StatusOK, l)
}

func (h *handler) createImage(w http.ResponseWriter, r *http.Request) {
	var req CreateImageRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if r.URL.Query().Get("progress") == "true" && req.Source != "" {
		h.copyImage(w, r, req)
		return
	}
	img, err := h.svc.CreateImage(r.Context(), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, img)
}

// copyImage streams a copy's progress as NDJSON; an error before the
// first line is an ordinary error answer, one after it the final line's.
func (h *handler) copyImage(w http.ResponseWriter, r *http.Request, req CreateImageRequest) {
	out := &ndjson{w: w, status: http.StatusCreated}
	img, err := h.svc.CopyImage(r.Context(), req, func(p CopyProgress) { out.send(p) })
	switch {
	case err != nil && !out.started:
		h.fail(w, r, err)
	case err != nil:
		out.send(CopyProgress{Final: true, Error: err.Error(), Code: StatusOf(err)})
	default:
		out.send(CopyProgress{Final: true, Image: &img, Done: img.Size, Total: img.Size})
	}
}

// ndjson is a progress stream: JSON lines, the status and Content-Type
// sent with the first one, each line flushed as it is written.
type ndjson struct {
	w       http.ResponseWriter
	status  int
	started bool
}

func (s *ndjson) send(v any) {
	if !s.started {
		s.w.Header().Set("Content-Type", "application/x-ndjson")
		s.w.WriteHeader(s.status)
		s.started = true
	}
	_ = json.NewEncoder(s.w).Encode(v)
	if f, ok := s.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (h *handler) getImage(w http.ResponseWriter, r *http.Request) {
	var view BlockView
	q := r.URL.Query()
	if s := q.Get("blocks"); s == "runs" {
		view.Runs = true
	} else if s != "" {
		b, err := strconv.ParseBool(s)
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Errorf("blocks=%q: want true, false or runs", s))
			return
		}
		view.Full = b
	}
	if s := q.Get("cells"); s != "" {
		c, err := strconv.ParseInt(s, 10, 64)
		if err != nil || c < 1 || c > MaxCells || !view.Runs {
			writeError(w, http.StatusBadRequest, fmt.Errorf("cells=%q: want 1 to %d, with blocks=runs", s, MaxCells))
			return
		}
		view.Cells = c
	}
	img, err := h.svc.GetImage(r.Context(), r.PathValue("name"), view)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (h *handler) deleteImage(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.DeleteImage(r.Context(), r.PathValue("name"), r.URL.Query().Get("now") == "true"); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) listTrash(w http.ResponseWriter, r *http.Request) {
	l, err := h.svc.ListTrash(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]TrashEntry{"trash": l})
}

func (h *handler) restoreTrash(w http.ResponseWriter, r *http.Request) {
	var req RestoreRequest
	if !decodeBody(w, r, &req) {
		return
	}
	img, err := h.svc.RestoreTrash(r.Context(), r.PathValue("ref"), req.Name)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (h *handler) purgeTrash(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.PurgeTrash(r.Context(), r.PathValue("ref")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
		return false
	}
	return true
}

func (h *handler) addLocation(w http.ResponseWriter, r *http.Request) {
	var req LocationRequest
	if !decodeBody(w, r, &req) {
		return
	}
	img, err := h.svc.AddLocation(r.Context(), r.PathValue("name"), req.Node)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (h *handler) removeLocation(w http.ResponseWriter, r *http.Request) {
	img, err := h.svc.RemoveLocation(r.Context(), r.PathValue("name"), r.PathValue("node"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

// syncImage answers with NDJSON: progress lines, then the final summary.
// An error before the first line is a normal error answer; one after it is
// in the summary line.
func (h *handler) syncImage(w http.ResponseWriter, r *http.Request) {
	var req SyncRequest
	if !decodeBody(w, r, &req) {
		return
	}
	out := &ndjson{w: w, status: http.StatusOK}
	err := h.svc.SyncImage(r.Context(), r.PathValue("name"), req, func(p SyncProgress) { out.send(p) })
	switch {
	case err != nil && !out.started:
		h.fail(w, r, err)
	case err != nil:
		out.send(SyncProgress{Final: true, Error: err.Error()})
	case !out.started:
		out.send(SyncProgress{Final: true})
	}
}

func (h *handler) verifyImage(w http.ResponseWriter, r *http.Request) {
	res, err := h.svc.VerifyImage(r.Context(), r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (h *handler) createSnapshot(w http.ResponseWriter, r *http.Request) {
	var req SnapshotRequest
	if !decodeBody(w, r, &req) {
		return
	}
	sn, err := h.svc.CreateSnapshot(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, sn)
}

func (h *handler) listSnapshots(w http.ResponseWriter, r *http.Request) {
	l, err := h.svc.ListSnapshots(r.Context(), r.PathValue("name"), r.URL.Query().Get("all") == "true")
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]Snapshot{"snapshots": l})
}

func (h *handler) revertSnapshot(w http.ResponseWriter, r *http.Request) {
	img, err := h.svc.RevertSnapshot(r.Context(), r.PathValue("name"), r.PathValue("snapshot"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

func (h *handler) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.DeleteSnapshot(r.Context(), r.PathValue("name"), r.PathValue("snapshot")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) resize(w http.ResponseWriter, r *http.Request) {
	var req ResizeRequest
	if !decodeBody(w, r, &req) {
		return
	}
	img, err := h.svc.ResizeImage(r.Context(), r.PathValue("name"), req.Size)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, img)
}

// readData streams the image. Errors before the first byte get a status;
// one after it cuts the body short of its Content-Length, which every
// HTTP client reports.
func (h *handler) readData(w http.ResponseWriter, r *http.Request) {
	h.stream(w, r, "image data", func(start func(length int64)) error {
		return h.svc.ReadData(r.Context(), r.PathValue("name"), start, w)
	})
}

func (h *handler) readDiff(w http.ResponseWriter, r *http.Request) {
	// A diff's length is not known: a stream cut short ends without its
	// end record, which the reader checks.
	h.stream(w, r, "diff", func(start func(length int64)) error {
		return h.svc.ReadDiff(r.Context(), r.PathValue("name"), r.URL.Query().Get("from"), func() { start(-1) }, w)
	})
}

// stream answers with an octet stream that run writes to w once it calls
// start (with the length, or -1 when it is not known). An error before
// start is an ordinary error answer; one after it cuts the stream, which
// the client sees as a short body.
func (h *handler) stream(w http.ResponseWriter, r *http.Request, what string, run func(start func(length int64)) error) {
	started := false
	err := run(func(length int64) {
		started = true
		w.Header().Set("Content-Type", "application/octet-stream")
		if length >= 0 {
			w.Header().Set("Content-Length", strconv.FormatInt(length, 10))
		}
		w.WriteHeader(http.StatusOK)
	})
	if err == nil {
		return
	}
	if !started {
		h.fail(w, r, err)
		return
	}
	h.log.Warn(what+" stream cut short", "path", r.URL.Path, "err", err)
	panic(http.ErrAbortHandler)
}

func (h *handler) writeDiff(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	out, err := h.svc.WriteDiff(r.Context(), r.PathValue("name"), r.Body, DiffOptions{Force: q.Get("force") == "true", NoSnapshot: q.Get("snapshot") == "false"})
	h.answer(w, r, out, err)
}

func (h *handler) writeData(w http.ResponseWriter, r *http.Request) {
	n, err := h.svc.WriteData(r.Context(), r.PathValue("name"), r.Body)
	if err != nil {
		h.fail(w, r, fmt.Errorf("after %d bytes: %w", n, err))
		return
	}
	writeJSON(w, http.StatusOK, DataWritten{Bytes: n})
}

// answer writes v, or the error.
func (h *handler) answer(w http.ResponseWriter, r *http.Request, v any, err error) {
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (h *handler) setImagePolicy(w http.ResponseWriter, r *http.Request) {
	var req ImagePolicyRequest
	if !decodeBody(w, r, &req) {
		return
	}
	p, err := h.svc.SetImagePolicy(r.Context(), r.PathValue("name"), req)
	h.answer(w, r, p, err)
}

func (h *handler) relocate(w http.ResponseWriter, r *http.Request) {
	var req RelocateRequest
	if !decodeBody(w, r, &req) {
		return
	}
	p, err := h.svc.Relocate(r.Context(), r.PathValue("name"), req)
	h.answer(w, r, p, err)
}

func (h *handler) plan(w http.ResponseWriter, r *http.Request) {
	a, err := h.svc.PlanImage(r.Context(), r.PathValue("name"))
	if a == nil {
		a = []Action{}
	}
	h.answer(w, r, map[string][]Action{"actions": a}, err)
}

func (h *handler) setSyncPolicy(w http.ResponseWriter, r *http.Request) {
	var req SyncPolicyRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if err := h.svc.SetSyncPolicy(r.Context(), req); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) syncPolicies(w http.ResponseWriter, r *http.Request) {
	p, err := h.svc.SyncPolicies(r.Context())
	h.answer(w, r, p, err)
}

// MaxCells bounds ?cells=: a picture of a block map needs no more.
const MaxCells = 1 << 16

func (h *handler) status(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.Status(r.Context())
	h.answer(w, r, st, err)
}

func (h *handler) iostat(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.IOStat(r.Context())
	h.answer(w, r, st, err)
}

// health answers 200 when every check passes, else 503 (what a load
// balancer's HTTP check wants), with the checks in the body either way.
func (h *handler) health(w http.ResponseWriter, r *http.Request) {
	hl := h.svc.Health(r.Context())
	code := http.StatusOK
	if hl.Status != "ok" {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, hl)
}

func (h *handler) stats(w http.ResponseWriter, r *http.Request) {
	st, err := h.svc.Stats(r.Context())
	h.answer(w, r, st, err)
}

func (h *handler) attach(w http.ResponseWriter, r *http.Request) {
	var req LocationRequest
	if !decodeBody(w, r, &req) {
		return
	}
	img, err := h.svc.Attach(r.Context(), r.PathValue("name"), req.Node)
	h.answer(w, r, img, err)
}

func (h *handler) detach(w http.ResponseWriter, r *http.Request) {
	img, err := h.svc.Detach(r.Context(), r.PathValue("name"))
	h.answer(w, r, img, err)
}

func (h *handler) export(w http.ResponseWriter, r *http.Request) {
	var req ExportRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if err := h.svc.Export(r.Context(), r.PathValue("name"), req); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) unexport(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.Unexport(r.Context(), r.PathValue("name"), r.PathValue("initiator")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handler) cordon(w http.ResponseWriter, r *http.Request) {
	var req CordonRequest
	if !decodeBody(w, r, &req) {
		return
	}
	op, err := h.svc.CordonNode(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, op)
}

func (h *handler) drain(w http.ResponseWriter, r *http.Request) {
	var req DrainRequest
	if !decodeBody(w, r, &req) {
		return
	}
	op, err := h.svc.DrainNode(r.Context(), r.PathValue("name"), req)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, op)
}

func (h *handler) drainStatus(w http.ResponseWriter, r *http.Request) {
	op, err := h.svc.NodeOperation(r.Context(), r.PathValue("name"))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, op)
}

func (h *handler) groups(w http.ResponseWriter, r *http.Request) {
	gs, err := h.svc.Groups(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string][]Group{"groups": gs})
}

func (h *handler) setGroup(w http.ResponseWriter, r *http.Request) {
	var g Group
	if !decodeBody(w, r, &g) {
		return
	}
	if g.Name != "" && g.Name != r.PathValue("name") {
		writeError(w, http.StatusBadRequest, fmt.Errorf("group name %q in the body differs from %q in the path", g.Name, r.PathValue("name")))
		return
	}
	g.Name = r.PathValue("name")
	out, err := h.svc.SetGroup(r.Context(), g)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (h *handler) deleteGroup(w http.ResponseWriter, r *http.Request) {
	if err := h.svc.DeleteGroup(r.Context(), r.PathValue("name")); err != nil {
		h.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
