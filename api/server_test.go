package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
)

// memService is a small in-memory Service: enough to exercise the HTTP
// mapping (status codes, bodies, errors) without a node.
type memService struct {
	images map[string]Image
	health string
}

func (m *memService) CreateImage(_ context.Context, r CreateImageRequest) (Image, error) {
	if err := meta.ValidateName(r.Name); err != nil {
		return Image{}, err
	}
	if _, ok := m.images[r.Name]; ok {
		return Image{}, fmt.Errorf("%q: %w", r.Name, meta.ErrImageExists)
	}
	m.images[r.Name] = Image{Name: r.Name, Size: r.Size}
	return m.images[r.Name], nil
}
func (m *memService) ListImages(context.Context) (ImageList, error) { return ImageList{}, nil }
func (m *memService) CopyImage(ctx context.Context, r CreateImageRequest, progress func(CopyProgress)) (Image, error) {
	progress(CopyProgress{Done: 0, Total: 2})
	progress(CopyProgress{Done: 1, Total: 2})
	return m.CreateImage(ctx, r)
}
func (m *memService) GetImage(_ context.Context, name string, _ BlockView) (Image, error) {
	img, ok := m.images[name]
	if !ok {
		return Image{}, fmt.Errorf("%q: %w", name, meta.ErrImageNotFound)
	}
	return img, nil
}
func (m *memService) DeleteImage(context.Context, string, bool) error {
	return fmt.Errorf("consul down: %w", meta.ErrUnavailable)
}
func (m *memService) ListTrash(context.Context) ([]TrashEntry, error) { return nil, nil }
func (m *memService) RestoreTrash(context.Context, string, string) (Image, error) {
	return Image{}, nil
}
func (m *memService) PurgeTrash(context.Context, string) error { return nil }
func (m *memService) ReadDiff(context.Context, string, string, func(), io.Writer) error {
	return nil
}
func (m *memService) WriteDiff(context.Context, string, io.Reader, DiffOptions) (DiffApplied, error) {
	return DiffApplied{}, nil
}
func (m *memService) NodeInfo(context.Context) (Node, error)    { return Node{Name: "n1"}, nil }
func (m *memService) ListNodes(context.Context) ([]Node, error) { return []Node{{Name: "n1"}}, nil }
func (m *memService) GetNode(context.Context, string) (Node, error) {
	return Node{}, meta.ErrNodeNotFound
}
func (m *memService) AddLocation(context.Context, string, string) (Image, error) {
	return Image{}, meta.ErrInvalid
}
func (m *memService) RemoveLocation(context.Context, string, string) (Image, error) {
	return Image{}, fmt.Errorf("block 3 %w", meta.ErrLastCopy)
}
func (m *memService) SyncImage(_ context.Context, _ string, _ SyncRequest, p func(SyncProgress)) error {
	p(SyncProgress{Done: 1, Total: 2})
	return fmt.Errorf("copy on n2 failed")
}
func (m *memService) VerifyImage(context.Context, string) (VerifyResult, error) {
	return VerifyResult{}, nil
}
func (m *memService) SetImageQoS(context.Context, string, QoSRequest) (QoS, error) {
	return QoS{}, nil
}
func (m *memService) SetImagePolicy(context.Context, string, ImagePolicyRequest) (ImagePolicy, error) {
	return ImagePolicy{}, fmt.Errorf("%w: spread_by zone needs 3 zones, 2 exist", meta.ErrInvalid)
}
func (m *memService) Relocate(context.Context, string, RelocateRequest) (ImagePolicy, error) {
	return ImagePolicy{}, nil
}
func (m *memService) PlanImage(context.Context, string) ([]Action, error)    { return nil, nil }
func (m *memService) SetSyncPolicy(context.Context, SyncPolicyRequest) error { return nil }
func (m *memService) SyncPolicies(context.Context) (SyncPolicies, error)     { return SyncPolicies{}, nil }
func (m *memService) Attach(context.Context, string, string) (Image, error)  { return Image{}, nil }
func (m *memService) Detach(context.Context, string) (Image, error)          { return Image{}, nil }
func (m *memService) Export(context.Context, string, ExportRequest) error    { return nil }
func (m *memService) Unexport(context.Context, string, string) error         { return nil }
func (m *memService) Stats(context.Context) (Stats, error)                   { return Stats{Node: "n1"}, nil }
func (m *memService) CreateSnapshot(context.Context, string, SnapshotRequest) (Snapshot, error) {
	return Snapshot{}, errors.New("not here")
}
func (m *memService) ListSnapshots(context.Context, string, bool) ([]Snapshot, error) {
	return nil, nil
}
func (m *memService) RevertSnapshot(context.Context, string, string) (Image, error) {
	return Image{}, nil
}
func (m *memService) DeleteSnapshot(context.Context, string, string) error { return nil }
func (m *memService) ResizeImage(context.Context, string, int64) (Image, error) {
	return Image{}, errors.New("not here")
}
func (m *memService) ReadData(_ context.Context, _ string, start func(int64), w io.Writer) error {
	start(4)
	_, err := w.Write([]byte("data"))
	return err
}
func (m *memService) WriteData(_ context.Context, _ string, r io.Reader) (int64, error) {
	return io.Copy(io.Discard, r)
}
func (m *memService) CordonNode(_ context.Context, node string, req CordonRequest) (NodeOperation, error) {
	if node != "n1" {
		return NodeOperation{}, meta.ErrNodeNotFound
	}
	return NodeOperation{Node: node, Cordoned: req.Cordoned}, nil
}
func (m *memService) DrainNode(_ context.Context, node string, _ DrainRequest) (NodeOperation, error) {
	return NodeOperation{}, fmt.Errorf("%w: draining %s cannot finish", meta.ErrRefused, node)
}
func (m *memService) NodeOperation(_ context.Context, node string) (NodeOperation, error) {
	return NodeOperation{Node: node}, nil
}
func (m *memService) SetGroup(_ context.Context, g Group) (Group, error) { return g, nil }
func (m *memService) Groups(context.Context) ([]Group, error)            { return nil, nil }
func (m *memService) DeleteGroup(context.Context, string) error          { return nil }
func (m *memService) Health(context.Context) Health {
	return Health{Node: "n1", Status: m.health, Checks: []HealthCheck{{Name: "metadata", OK: m.health == "ok"}}}
}
func (m *memService) Status(context.Context) (ClusterStatus, error) {
	return ClusterStatus{Healthy: true}, nil
}
func (m *memService) IOStat(context.Context) (IOStat, error) { return IOStat{}, nil }

func TestHandlerStatusCodes(t *testing.T) {
	srv := httptest.NewServer(NewHandler(&memService{images: map[string]Image{}}, "test", slog.New(slog.DiscardHandler)))
	defer srv.Close()
	for _, c := range []struct {
		method, path, body string
		status             int
		want               string
	}{
		{"POST", "/v1/images", `{"name":"vm1","size":1048576}`, 201, `"name": "vm1"`},
		{"POST", "/v1/images", `{"name":"vm1","size":1048576}`, 409, "already exists"},
		{"POST", "/v1/images", `{"name":"Bad!","size":1}`, 400, "image name"},
		{"POST", "/v1/images", `{"name":"x","size":1,"bogus":2}`, 400, "unknown field"},
		{"POST", "/v1/images", `not json`, 400, "bad request body"},
		{"GET", "/v1/images/vm1", "", 200, `"size": 1048576`},
		{"GET", "/v1/images/vm1?blocks=maybe", "", 400, "want true, false or runs"},
		{"GET", "/v1/images/nope", "", 404, "not found"},
		{"DELETE", "/v1/images/vm1", "", 503, "unavailable"},
		{"GET", "/v1/nodes/zz", "", 404, "node not found"},
		{"PUT", "/v1/images/vm1/policy", `{"spread_by":"zone"}`, 400, "needs 3 zones"},
		{"GET", "/v1/images/vm1/plan", "", 200, `"actions": []`},
		{"PUT", "/v1/policies/sync", `{"scope":"default","windows":["22:00-06:00"]}`, 204, ""},
		{"GET", "/v1/stats", "", 200, `"node": "n1"`},
		{"DELETE", "/v1/images/vm1/locations/n1", "", 409, "last in-sync copy"},
		{"POST", "/v1/images/vm1/sync", `{}`, 200, `"error":"copy on n2 failed"`},
		{"GET", "/v1/nodes", "", 200, `"nodes"`},
		{"PUT", "/v1/nodes/n1/cordon", `{"cordoned":true}`, 200, `"cordoned": true`},
		{"PUT", "/v1/nodes/zz/cordon", `{"cordoned":true}`, 404, "node not found"},
		{"POST", "/v1/nodes/n1/drain", `{"now":true}`, 409, "draining n1 cannot finish"},
		{"POST", "/v1/nodes/n1/drain", `{"later":true}`, 400, "unknown field"},
		{"PUT", "/v1/groups/db", `{"name":"web","kind":"affinity","label":"rack"}`, 400, "differs from"},
		{"GET", "/v2/whatever", "", 404, "no such API endpoint"},
		{"PATCH", "/v1/images/vm1", "", 404, "no such API endpoint: PATCH"},
	} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, strings.NewReader(c.body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status || !strings.Contains(string(b), c.want) {
			t.Errorf("%s %s: %d %s; want %d containing %q", c.method, c.path, resp.StatusCode, b, c.status, c.want)
		}
	}
	// The client turns error bodies into errors carrying the message.
	_, err := NewClient(strings.TrimPrefix(srv.URL, "http://")).GetImage(context.Background(), "nope", false)
	if se, ok := err.(*StatusError); !ok || se.Status != 404 || !strings.Contains(se.Message, "not found") {
		t.Fatalf("client error: %#v", err)
	}
}
