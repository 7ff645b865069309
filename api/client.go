package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client talks to one node's control API.
type Client struct {
	base   string
	http   *http.Client
	stream *http.Client // no overall timeout: long syncs stream progress
	token  string       // bearer token sent with every request, if set
	tls    *tls.Config  // https settings, for For
	err    error        // returned by every call (NewErrorClient)
}

// NewClient returns a client for addr ("127.0.0.1:7700" or a URL).
func NewClient(addr string) *Client {
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &Client{base: strings.TrimRight(base, "/"), http: &http.Client{Timeout: 60 * time.Second}, stream: &http.Client{}}
}

// NewClientWithAuth is NewClient that sends "Authorization: Bearer token"
// with every request (when token is not empty) and, when tlsConf is not
// nil, speaks https with it: an address without a scheme gets https://,
// and an explicit http:// one is refused (every call fails) rather than
// silently sending the token unencrypted.
func NewClientWithAuth(addr string, token string, tlsConf *tls.Config) *Client {
	if tlsConf != nil {
		switch {
		case strings.HasPrefix(addr, "http://"):
			return NewErrorClient(fmt.Errorf("API address %s is plain http, but TLS (a CA) is configured: use https://", addr))
		case !strings.Contains(addr, "://"):
			addr = "https://" + addr
		}
	}
	c := NewClient(addr)
	c.token = token
	c.tls = tlsConf
	if tlsConf != nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = tlsConf
		c.http.Transport = tr
		c.stream.Transport = tr
	}
	return c
}

// NewErrorClient returns a Client whose every call fails with err: for a
// caller that builds its client where it cannot return an error (a bad
// token file, say) and reports it at the first call.
func NewErrorClient(err error) *Client {
	return &Client{err: err, http: &http.Client{}, stream: &http.Client{}}
}

// authorize adds the bearer token, if any, to req.
func (c *Client) authorize(req *http.Request) {
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
}

// StatusError is a non-2xx answer.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	return c.doOn(c.http, ctx, method, path, in, out)
}

// doOn is do through hc (c.stream for calls that may take long).
func (c *Client) doOn(hc *http.Client, ctx context.Context, method, path string, in, out any) error {
	if c.err != nil {
		return c.err
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	c.authorize(req)
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the ukai API at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read answer of %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		return errorAnswer(resp.StatusCode, data)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decode answer of %s %s: %w", method, path, err)
		}
	}
	return nil
}

// Version returns the server's version.
func (c *Client) Version(ctx context.Context) (Version, error) {
	var v Version
	return v, c.do(ctx, http.MethodGet, "/v1/version", nil, &v)
}

// Node describes the node that answers.
func (c *Client) Node(ctx context.Context) (Node, error) {
	var n Node
	return n, c.do(ctx, http.MethodGet, "/v1/node", nil, &n)
}

// ListNodes lists the cluster's members as the node sees them.
func (c *Client) ListNodes(ctx context.Context) ([]Node, error) {
	var l struct {
		Nodes []Node `json:"nodes"`
	}
	return l.Nodes, c.do(ctx, http.MethodGet, "/v1/nodes", nil, &l)
}

// GetNode describes one member.
func (c *Client) GetNode(ctx context.Context, name string) (Node, error) {
	var n Node
	return n, c.do(ctx, http.MethodGet, "/v1/nodes/"+url.PathEscape(name), nil, &n)
}

// CreateImage creates an image.
func (c *Client) CreateImage(ctx context.Context, req CreateImageRequest) (Image, error) {
	var img Image
	if req.Source != "" {
		// Copies the source's data: may take long.
		return img, c.doOn(c.stream, ctx, http.MethodPost, "/v1/images", req, &img)
	}
	return img, c.do(ctx, http.MethodPost, "/v1/images", req, &img)
}

// ListImages lists images.
func (c *Client) ListImages(ctx context.Context) (ImageList, error) {
	var l ImageList
	return l, c.do(ctx, http.MethodGet, "/v1/images", nil, &l)
}

// GetImage describes one image; blocks adds the per-block map.
func (c *Client) GetImage(ctx context.Context, name string, blocks bool) (Image, error) {
	var img Image
	q := ""
	if blocks {
		q = "?blocks=true"
	}
	return img, c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(name)+q, nil, &img)
}

// ImageRuns describes one image with its block map as runs (cells > 0:
// at most that many cells per location, see BlockView).
func (c *Client) ImageRuns(ctx context.Context, name string, cells int64) (Image, error) {
	var img Image
	q := "?blocks=runs"
	if cells > 0 {
		q += "&cells=" + strconv.FormatInt(cells, 10)
	}
	return img, c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(name)+q, nil, &img)
}

// CopyImage creates an image from req.Source (clone, or copy of a
// snapshot), calling progress with each progress line.
func (c *Client) CopyImage(ctx context.Context, req CreateImageRequest, progress func(CopyProgress)) (Image, error) {
	if c.err != nil {
		return Image{}, c.err
	}
	b, err := json.Marshal(req)
	if err != nil {
		return Image{}, err
	}
	resp, err := c.openStream(ctx, http.MethodPost, "/v1/images?progress=true", bytes.NewReader(b), "application/json")
	if err != nil {
		return Image{}, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/x-ndjson") {
		// A node older than the progress stream answers with the image.
		var img Image
		if err := dec.Decode(&img); err != nil {
			return Image{}, fmt.Errorf("decode answer of POST /v1/images: %w", err)
		}
		return img, nil
	}
	for {
		var p CopyProgress
		if err := dec.Decode(&p); err == io.EOF {
			return Image{}, errors.New("copy progress stream ended without a result (the node went away?)")
		} else if err != nil {
			return Image{}, fmt.Errorf("copy progress stream: %w", err)
		}
		if p.Final {
			if p.Error != "" {
				return Image{}, &StatusError{Status: p.Code, Message: p.Error}
			}
			if p.Image == nil {
				return Image{}, errors.New("copy progress stream: a final line without the image")
			}
			return *p.Image, nil
		}
		if progress != nil {
			progress(p)
		}
	}
}

// Status returns the cluster's health as the node sees it.
func (c *Client) Status(ctx context.Context) (ClusterStatus, error) {
	var st ClusterStatus
	return st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// IOStat returns the node's per-image I/O counters.
func (c *Client) IOStat(ctx context.Context) (IOStat, error) {
	var st IOStat
	return st, c.do(ctx, http.MethodGet, "/v1/iostat", nil, &st)
}

// For returns a client of another node's API at addr, with this client's
// token and TLS settings.
func (c *Client) For(addr string) *Client {
	if c.err != nil {
		return c
	}
	return NewClientWithAuth(addr, c.token, c.tls)
}

// DeleteImage moves an image to the trash; with now it deletes the image
// and its data at once.
func (c *Client) DeleteImage(ctx context.Context, name string, now bool) error {
	path := "/v1/images/" + url.PathEscape(name)
	if now {
		path += "?now=true"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

// ListTrash lists the images in the trash.
func (c *Client) ListTrash(ctx context.Context) ([]TrashEntry, error) {
	var out map[string][]TrashEntry
	err := c.do(ctx, http.MethodGet, "/v1/trash", nil, &out)
	return out["trash"], err
}

// RestoreTrash brings an image back from the trash (ref: its id or name)
// under name (its own when empty).
func (c *Client) RestoreTrash(ctx context.Context, ref, name string) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodPost, "/v1/trash/"+url.PathEscape(ref)+"/restore", RestoreRequest{Name: name}, &img)
}

// PurgeTrash deletes an image in the trash for good.
func (c *Client) PurgeTrash(ctx context.Context, ref string) error {
	return c.do(ctx, http.MethodDelete, "/v1/trash/"+url.PathEscape(ref), nil, nil)
}

// AddLocation adds a copy of image on node (it starts out of sync).
func (c *Client) AddLocation(ctx context.Context, image, node string) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/locations", LocationRequest{Node: node}, &img)
}

// RemoveLocation removes node's copy of image.
func (c *Client) RemoveLocation(ctx context.Context, image, node string) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(image)+"/locations/"+url.PathEscape(node), nil, &img)
}

// VerifyImage compares the in-sync copies of image.
func (c *Client) VerifyImage(ctx context.Context, image string) (VerifyResult, error) {
	var r VerifyResult
	return r, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/verify", struct{}{}, &r)
}

// SyncImage runs a sync and calls progress for every line the node
// streams; it returns the error of the final line, if any.
func (c *Client) SyncImage(ctx context.Context, image string, req SyncRequest, progress func(SyncProgress)) error {
	if c.err != nil {
		return c.err
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	resp, err := c.openStream(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/sync", bytes.NewReader(b), "application/json")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	sawFinal := false
	for {
		var p SyncProgress
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			return fmt.Errorf("sync progress stream: %w", err)
		}
		if progress != nil {
			progress(p)
		}
		if p.Final {
			sawFinal = true
			if p.Error != "" {
				return errors.New(p.Error)
			}
		}
	}
	if !sawFinal {
		return errors.New("sync progress stream ended without a summary (the node went away?)")
	}
	return nil
}

// SetImagePolicy changes the image's desired state.
func (c *Client) SetImagePolicy(ctx context.Context, image string, req ImagePolicyRequest) (ImagePolicy, error) {
	var p ImagePolicy
	return p, c.do(ctx, http.MethodPut, "/v1/images/"+url.PathEscape(image)+"/policy", req, &p)
}

// Relocate starts or cancels a relocation.
func (c *Client) Relocate(ctx context.Context, image string, req RelocateRequest) (ImagePolicy, error) {
	var p ImagePolicy
	return p, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/relocate", req, &p)
}

// PlanImage returns what the planner would do now.
func (c *Client) PlanImage(ctx context.Context, image string) ([]Action, error) {
	var r struct {
		Actions []Action `json:"actions"`
	}
	return r.Actions, c.do(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(image)+"/plan", nil, &r)
}

// SetSyncPolicy sets or clears a sync policy.
func (c *Client) SetSyncPolicy(ctx context.Context, req SyncPolicyRequest) error {
	return c.do(ctx, http.MethodPut, "/v1/policies/sync", req, nil)
}

// SyncPolicies lists the sync policies.
func (c *Client) SyncPolicies(ctx context.Context) (SyncPolicies, error) {
	var p SyncPolicies
	return p, c.do(ctx, http.MethodGet, "/v1/policies/sync", nil, &p)
}

// Stats returns the node's counters.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	return s, c.do(ctx, http.MethodGet, "/v1/stats", nil, &s)
}

// Attach makes node the image's owner until Detach.
func (c *Client) Attach(ctx context.Context, image, node string) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/attach", LocationRequest{Node: node}, &img)
}

// Detach unpins the image's owner.
func (c *Client) Detach(ctx context.Context, image string) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/detach", struct{}{}, &img)
}

// Export allows an initiator to log in to image.
func (c *Client) Export(ctx context.Context, image string, req ExportRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/exports", req, nil)
}

// Unexport removes an initiator's access to image.
func (c *Client) Unexport(ctx context.Context, image, initiator string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(image)+"/exports/"+url.PathEscape(initiator), nil, nil)
}

// CreateSnapshot takes a snapshot of image.
func (c *Client) CreateSnapshot(ctx context.Context, image string, req SnapshotRequest) (Snapshot, error) {
	var sn Snapshot
	return sn, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/snapshots", req, &sn)
}

// ListSnapshots lists the snapshots of image; all adds the ones ukai took
// for itself (a clone's temporary snapshot).
func (c *Client) ListSnapshots(ctx context.Context, image string, all bool) ([]Snapshot, error) {
	var out map[string][]Snapshot
	path := "/v1/images/" + url.PathEscape(image) + "/snapshots"
	if all {
		path += "?all=true"
	}
	err := c.do(ctx, http.MethodGet, path, nil, &out)
	return out["snapshots"], err
}

// RevertSnapshot writes snapshot's data back over image, in place.
func (c *Client) RevertSnapshot(ctx context.Context, image, snapshot string) (Image, error) {
	var img Image
	// Rewrites what changed since the snapshot: may take long.
	return img, c.doOn(c.stream, ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/snapshots/"+url.PathEscape(snapshot)+"/revert", nil, &img)
}

// DeleteSnapshot deletes a snapshot of image.
func (c *Client) DeleteSnapshot(ctx context.Context, image, snapshot string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(image)+"/snapshots/"+url.PathEscape(snapshot), nil, nil)
}

// ResizeImage grows image to size bytes.
func (c *Client) ResizeImage(ctx context.Context, image string, size int64) (Image, error) {
	var img Image
	return img, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(image)+"/resize", ResizeRequest{Size: size}, &img)
}

// ReadData streams the image (or snapshot) into w, calling start with its
// size first. A stream cut short is an error.
func (c *Client) ReadData(ctx context.Context, image string, start func(size int64), w io.Writer) error {
	if c.err != nil {
		return c.err
	}
	resp, err := c.openStream(ctx, http.MethodGet, "/v1/images/"+url.PathEscape(image)+"/data", nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.ContentLength < 0 {
		return fmt.Errorf("image data of %s without a length", image)
	}
	start(resp.ContentLength)
	n, err := io.Copy(w, resp.Body)
	if err == nil && n != resp.ContentLength {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return fmt.Errorf("image data of %s after %d bytes: %w", image, n, err)
	}
	return nil
}

// ReadDiff streams the diff from snapshot from to snapshot name
// (IMAGE@SNAP) into w.
func (c *Client) ReadDiff(ctx context.Context, name, from string, start func(), w io.Writer) error {
	if c.err != nil {
		return c.err
	}
	path := "/v1/images/" + url.PathEscape(name) + "/diff"
	if from != "" {
		path += "?from=" + url.QueryEscape(from)
	}
	resp, err := c.openStream(ctx, http.MethodGet, path, nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	start()
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("diff of %s: %w", name, err)
	}
	return nil
}

// WriteDiff applies the diff stream r to image.
func (c *Client) WriteDiff(ctx context.Context, image string, r io.Reader, opts DiffOptions) (DiffApplied, error) {
	var out DiffApplied
	if c.err != nil {
		return out, c.err
	}
	q := url.Values{}
	if opts.Force {
		q.Set("force", "true")
	}
	if opts.NoSnapshot {
		q.Set("snapshot", "false")
	}
	path := "/v1/images/" + url.PathEscape(image) + "/diff"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	resp, err := c.openStream(ctx, http.MethodPut, path, r, "application/octet-stream")
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return out, err
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return out, fmt.Errorf("decode answer of PUT diff: %w", err)
	}
	return out, nil
}

// WriteData writes r into the image from its start.
func (c *Client) WriteData(ctx context.Context, image string, r io.Reader) (int64, error) {
	if c.err != nil {
		return 0, c.err
	}
	resp, err := c.openStream(ctx, http.MethodPut, "/v1/images/"+url.PathEscape(image)+"/data", r, "application/octet-stream")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, err
	}
	var out DataWritten
	if err := json.Unmarshal(data, &out); err != nil {
		return 0, fmt.Errorf("decode answer of PUT data: %w", err)
	}
	return out.Bytes, nil
}

// openStream sends a request through the client without an overall
// timeout (long transfers, progress streams) and returns the answer when
// it is a success; the caller closes its body.
func (c *Client) openStream(ctx context.Context, method, path string, body io.Reader, contentType string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	c.authorize(req)
	resp, err := c.stream.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the ukai API at %s: %w", c.base, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		return nil, statusError(resp)
	}
	return resp, nil
}

// statusError reads a non-2xx answer into a StatusError.
func statusError(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return errorAnswer(resp.StatusCode, data)
}

// errorAnswer is the StatusError of an answer's body: ukai's {"error": ...}
// message, or the body's text.
func errorAnswer(status int, data []byte) error {
	var e Error
	if json.Unmarshal(data, &e) != nil || e.Error == "" {
		e.Error = strings.TrimSpace(string(data))
	}
	return &StatusError{Status: status, Message: e.Error}
}

// CordonNode cordons a node (cordon false: uncordons it, which stops a
// drain and hands back the owners it moved).
func (c *Client) CordonNode(ctx context.Context, node string, req CordonRequest) (NodeOperation, error) {
	var op NodeOperation
	return op, c.doOn(c.stream, ctx, http.MethodPut, "/v1/nodes/"+url.PathEscape(node)+"/cordon", req, &op)
}

// DrainNode starts a drain.
func (c *Client) DrainNode(ctx context.Context, node string, req DrainRequest) (NodeOperation, error) {
	var op NodeOperation
	return op, c.doOn(c.stream, ctx, http.MethodPost, "/v1/nodes/"+url.PathEscape(node)+"/drain", req, &op)
}

// NodeOperation is a node's cordon and drain state with the drain's
// progress.
func (c *Client) NodeOperation(ctx context.Context, node string) (NodeOperation, error) {
	var op NodeOperation
	return op, c.do(ctx, http.MethodGet, "/v1/nodes/"+url.PathEscape(node)+"/drain", nil, &op)
}

// SetGroup sets a group's rule.
func (c *Client) SetGroup(ctx context.Context, g Group) (Group, error) {
	var out Group
	return out, c.do(ctx, http.MethodPut, "/v1/groups/"+url.PathEscape(g.Name), g, &out)
}

// Groups lists the groups.
func (c *Client) Groups(ctx context.Context) ([]Group, error) {
	var r struct {
		Groups []Group `json:"groups"`
	}
	return r.Groups, c.do(ctx, http.MethodGet, "/v1/groups", nil, &r)
}

// DeleteGroup deletes a group without images.
func (c *Client) DeleteGroup(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/groups/"+url.PathEscape(name), nil, nil)
}
