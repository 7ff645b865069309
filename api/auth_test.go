package api

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

const testToken = "tok-3f9a1c7e5b2d4a68"

// authServer serves NewHandler over a memService behind RequireToken, with
// the request log captured at debug level; calls counts the requests that
// got past the token check.
func authServer(t *testing.T) (srv *httptest.Server, svc *memService, logs *bytes.Buffer, calls *atomic.Int64) {
	t.Helper()
	logs = &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	svc = &memService{images: map[string]Image{}}
	calls = &atomic.Int64{}
	inner := NewHandler(svc, "test", log)
	counted := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		inner.ServeHTTP(w, r)
	})
	srv = httptest.NewServer(RequireToken(counted, []byte(testToken)))
	t.Cleanup(srv.Close)
	return srv, svc, logs, calls
}

func TestRequireTokenRefuses(t *testing.T) {
	srv, svc, logs, calls := authServer(t)
	for _, auth := range []string{
		"",
		"Bearer",
		"Bearer ",
		"Bearer wrong",
		"Bearer " + testToken + "x",
		"Bearer " + testToken[:len(testToken)-1],
		"Basic " + testToken,
		testToken,
	} {
		req, _ := http.NewRequest("POST", srv.URL+"/v1/images", strings.NewReader(`{"name":"vm1","size":1048576}`))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("Authorization %q: status %d", auth, resp.StatusCode)
		}
		if !strings.Contains(string(b), `"error": "missing or invalid bearer token"`) {
			t.Errorf("Authorization %q: body %s", auth, b)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
		if wa := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer") {
			t.Errorf("WWW-Authenticate %q", wa)
		}
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("the handler was called %d times", n)
	}
	if len(svc.images) != 0 {
		t.Errorf("refused POSTs created images: %v", svc.images)
	}
	if strings.Contains(logs.String(), testToken) {
		t.Errorf("token in the log:\n%s", logs)
	}
}

func TestRequireTokenAccepts(t *testing.T) {
	srv, svc, logs, calls := authServer(t)
	for _, auth := range []string{"Bearer " + testToken, "bearer " + testToken, "Bearer  " + testToken + " "} {
		req, _ := http.NewRequest("GET", srv.URL+"/v1/stats", nil)
		req.Header.Set("Authorization", auth)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("Authorization %q: status %d", auth, resp.StatusCode)
		}
	}
	// Through the client, which sends the token.
	ctx := context.Background()
	c := NewClientWithAuth(srv.URL, testToken, nil)
	if _, err := c.CreateImage(ctx, CreateImageRequest{Name: "vm1", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, ok := svc.images["vm1"]; !ok {
		t.Fatal("image not created")
	}
	if err := c.SyncImage(ctx, "vm1", SyncRequest{}, nil); err == nil || !strings.Contains(err.Error(), "copy on n2 failed") {
		t.Errorf("sync through the token check: %v", err)
	}
	if calls.Load() != 5 {
		t.Errorf("handler called %d times, want 5", calls.Load())
	}
	// A client with a wrong token, or none, gets a 401 StatusError that
	// does not show the token.
	for _, tok := range []string{"", "not-" + testToken} {
		_, err := NewClientWithAuth(srv.URL, tok, nil).CreateImage(ctx, CreateImageRequest{Name: "vm2", Size: 1 << 20})
		var se *StatusError
		if !errors.As(err, &se) || se.Status != http.StatusUnauthorized || se.Message != "missing or invalid bearer token" {
			t.Errorf("token %q: %#v", tok, err)
		}
		if err != nil && strings.Contains(err.Error(), testToken) {
			t.Errorf("error shows the token: %v", err)
		}
		err = NewClientWithAuth(srv.URL, tok, nil).SyncImage(ctx, "vm1", SyncRequest{}, nil)
		if !errors.As(err, &se) || se.Status != http.StatusUnauthorized {
			t.Errorf("sync with token %q: %#v", tok, err)
		}
	}
	if _, ok := svc.images["vm2"]; ok {
		t.Error("refused request created an image")
	}
	if !strings.Contains(logs.String(), "api request") {
		t.Fatalf("nothing logged (is the capture working?):\n%s", logs)
	}
	if strings.Contains(logs.String(), testToken) {
		t.Errorf("token in the log:\n%s", logs)
	}
}

func TestRequireTokenVersionOpen(t *testing.T) {
	srv, _, _, _ := authServer(t)
	v, err := NewClient(srv.URL).Version(context.Background())
	if err != nil || v.Version != "test" {
		t.Fatalf("version without a token: %v %v", v, err)
	}
	// Only GET, and only that path.
	for _, r := range []struct{ method, path string }{{"POST", "/v1/version"}, {"GET", "/v1/version/"}, {"GET", "/v1/node"}} {
		req, _ := http.NewRequest(r.method, srv.URL+r.path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s %s without a token: %d", r.method, r.path, resp.StatusCode)
		}
	}
}

func TestRequireTokenEmptyRefusesAll(t *testing.T) {
	srv := httptest.NewServer(RequireToken(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		t.Error("handler called")
	}), nil))
	defer srv.Close()
	for _, auth := range []string{"", "Bearer ", "Bearer x"} {
		req, _ := http.NewRequest("GET", srv.URL+"/v1/node", nil)
		req.Header.Set("Authorization", auth)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%q: %d", auth, resp.StatusCode)
		}
	}
}

func TestClientTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, err := tlsutil.InitCA(dir, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := tlsutil.Issue(ca, caKey, dir, "n1", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	serverConf, err := tlsutil.Files{CA: ca, Cert: cert, Key: key}.ServerConfigClientCertOptional()
	if err != nil {
		t.Fatal(err)
	}
	svc := &memService{images: map[string]Image{}}
	srv := httptest.NewUnstartedServer(RequireToken(NewHandler(svc, "test", slog.New(slog.DiscardHandler)), []byte(testToken)))
	srv.TLS = serverConf
	srv.StartTLS()
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")

	clientConf, err := tlsutil.Files{CA: ca}.ClientConfig("")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// No scheme: https because a TLS config is given.
	if _, err := NewClientWithAuth(addr, testToken, clientConf).Stats(ctx); err != nil {
		t.Fatalf("https with the CA: %v", err)
	}
	if _, err := NewClientWithAuth(srv.URL, testToken, clientConf).Stats(ctx); err != nil {
		t.Fatalf("https:// URL with the CA: %v", err)
	}
	// Without the CA the server is not trusted.
	if _, err := NewClientWithAuth(srv.URL, testToken, nil).Stats(ctx); err == nil {
		t.Error("server trusted without the CA")
	}
	// TLS and an explicit http:// address: refused before anything is sent.
	_, err = NewClientWithAuth("http://"+addr, testToken, clientConf).Stats(ctx)
	if err == nil || !strings.Contains(err.Error(), "use https://") {
		t.Errorf("http:// with TLS: %v", err)
	}
}

func TestErrorClient(t *testing.T) {
	want := errors.New("token file is readable by others")
	c := NewErrorClient(want)
	if _, err := c.Stats(context.Background()); !errors.Is(err, want) {
		t.Errorf("Stats: %v", err)
	}
	if err := c.SyncImage(context.Background(), "vm1", SyncRequest{}, nil); !errors.Is(err, want) {
		t.Errorf("SyncImage: %v", err)
	}
}

// The profiler (Options.Pprof) is behind the token like every endpoint:
// heap and goroutine dumps show memory contents, and a CPU profile or
// trace runs as long as the caller asks.
func TestPprofBehindToken(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	get := func(h http.Handler, path, auth string) int {
		t.Helper()
		srv := httptest.NewServer(h)
		defer srv.Close()
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	svc := &memService{images: map[string]Image{}}
	paths := []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/goroutine?debug=2", "/debug/pprof/cmdline", "/debug/pprof/symbol", "/debug/pprof/profile?seconds=1", "/debug/pprof/trace?seconds=1"}
	h := NewServerHandler(svc, "test", log, Options{Token: []byte(testToken), Pprof: true})
	for _, p := range paths {
		for _, auth := range []string{"", "Bearer wrong", "Basic " + testToken} {
			if code := get(h, p, auth); code != http.StatusUnauthorized {
				t.Errorf("GET %s with %q: %d, want 401", p, auth, code)
			}
		}
	}
	for _, p := range paths[:5] {
		if code := get(h, p, "Bearer "+testToken); code != http.StatusOK {
			t.Errorf("GET %s with the token: %d, want 200", p, code)
		}
	}
	if code := get(h, "/v1/version", ""); code != http.StatusOK {
		t.Errorf("/v1/version without a token: %d, want 200 (it stays open)", code)
	}
	if code := get(h, "/v1/images", ""); code != http.StatusUnauthorized {
		t.Errorf("/v1/images without a token: %d, want 401", code)
	}
	// Off: no profiler, token or not.
	off := NewServerHandler(svc, "test", log, Options{Token: []byte(testToken)})
	if code := get(off, "/debug/pprof/", "Bearer "+testToken); code != http.StatusNotFound {
		t.Errorf("profiler off: %d, want 404", code)
	}
	// No token configured (a loopback API): the API and the profiler are open alike.
	open := NewServerHandler(svc, "test", log, Options{Pprof: true})
	if code := get(open, "/debug/pprof/cmdline", ""); code != http.StatusOK {
		t.Errorf("profiler without a configured token: %d, want 200", code)
	}
}
