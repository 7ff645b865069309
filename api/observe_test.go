package api

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// observeServer is NewServerHandler with a fake metrics handler and UI.
func observeServer(t *testing.T, public bool) (*httptest.Server, *memService) {
	t.Helper()
	svc := &memService{images: map[string]Image{}, health: "ok"}
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ukai_up 1\n") })
	ui := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "<html>ui</html>") })
	srv := httptest.NewServer(NewServerHandler(svc, "test", slog.New(slog.DiscardHandler), Options{
		Token: []byte(testToken), Metrics: metrics, MetricsPublic: public, UI: ui,
	}))
	t.Cleanup(srv.Close)
	return srv, svc
}

func get(t *testing.T, c *http.Client, u string, hdr ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", u, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetricsBehindTokenUnlessPublic(t *testing.T) {
	for _, public := range []bool{false, true} {
		srv, _ := observeServer(t, public)
		code, body := get(t, http.DefaultClient, srv.URL+"/metrics")
		if public && (code != 200 || body != "ukai_up 1\n") {
			t.Errorf("public: GET /metrics without a token: %d %q", code, body)
		}
		if !public && code != http.StatusUnauthorized {
			t.Errorf("not public: GET /metrics without a token: %d %q", code, body)
		}
		if code, _ := get(t, http.DefaultClient, srv.URL+"/metrics", "Authorization", "Bearer "+testToken); code != 200 {
			t.Errorf("public=%v: GET /metrics with the token: %d", public, code)
		}
		// Public metrics open nothing else.
		if code, _ := get(t, http.DefaultClient, srv.URL+"/v1/images"); code != http.StatusUnauthorized {
			t.Errorf("public=%v: GET /v1/images without a token: %d", public, code)
		}
	}
}

func TestHealthIsOpenAndSaysWhy(t *testing.T) {
	srv, svc := observeServer(t, false)
	code, body := get(t, http.DefaultClient, srv.URL+HealthPath)
	if code != 200 || !strings.Contains(body, `"status": "ok"`) {
		t.Fatalf("healthy: %d %s", code, body)
	}
	svc.health = "failing"
	code, body = get(t, http.DefaultClient, srv.URL+HealthPath)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, `"ok": false`) {
		t.Fatalf("failing: %d %s", code, body)
	}
}

func TestUILogin(t *testing.T) {
	srv, svc := observeServer(t, false)
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	// Without the token: the login form, 401; the UI handler is not run.
	code, body := get(t, noRedirect, srv.URL+"/ui/")
	if code != http.StatusUnauthorized || !strings.Contains(body, `action="/ui/login"`) || strings.Contains(body, "<html>ui</html>") {
		t.Fatalf("GET /ui/ without a token: %d %s", code, body)
	}
	post := func(form url.Values) *http.Response {
		resp, err := noRedirect.PostForm(srv.URL+LoginPath, form)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	if resp := post(url.Values{"token": {"wrong"}}); resp.StatusCode != http.StatusUnauthorized || len(resp.Cookies()) != 0 {
		t.Fatalf("wrong token: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	resp := post(url.Values{"token": {testToken}, "next": {"https://evil.example/"}})
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/ui/" {
		t.Fatalf("right token: %d, Location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == TokenCookie {
			cookie = c
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode || cookie.MaxAge <= 0 {
		t.Fatalf("cookie %+v", cookie)
	}
	// The cookie is not the token: another service on the host that sees
	// it cannot use it as one.
	if strings.Contains(cookie.Value, testToken) {
		t.Fatalf("the cookie holds the token")
	}
	if code, _ := get(t, noRedirect, srv.URL+"/v1/images", "Authorization", "Bearer "+cookie.Value); code != http.StatusUnauthorized {
		t.Fatalf("the cookie's value as a bearer token: %d", code)
	}
	withCookie := func(method, path string) int {
		req, _ := http.NewRequest(method, srv.URL+path, strings.NewReader(`{"name":"vm1","size":1048576}`))
		req.AddCookie(cookie)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if c := withCookie("GET", "/ui/"); c != 200 {
		t.Fatalf("GET /ui/ with the cookie: %d", c)
	}
	if c := withCookie("GET", "/v1/images"); c != 200 {
		t.Fatalf("GET /v1/images with the cookie: %d", c)
	}
	// Only what the page reads: not an image's data, not the status.
	for _, p := range []string{"/v1/images/vm1/data", "/v1/status", "/metrics"} {
		if c := withCookie("GET", p); c != http.StatusUnauthorized {
			t.Fatalf("GET %s with the cookie: %d", p, c)
		}
	}
	// A forged cookie is refused.
	req, _ := http.NewRequest("GET", srv.URL+"/v1/images", nil)
	req.AddCookie(&http.Cookie{Name: TokenCookie, Value: testToken})
	if resp, err := noRedirect.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the token itself as the cookie: %v %v", err, resp.StatusCode)
	}
	// The cookie never changes anything: a page of another site cannot
	// use a logged-in browser to create or delete.
	if c := withCookie("POST", "/v1/images"); c != http.StatusUnauthorized || len(svc.images) != 0 {
		t.Fatalf("POST with only the cookie: %d, images %v", c, svc.images)
	}
}

func TestCopyImageStreamsProgress(t *testing.T) {
	svc := &memService{images: map[string]Image{}}
	srv := httptest.NewServer(NewHandler(svc, "test", slog.New(slog.DiscardHandler)))
	defer srv.Close()
	c := NewClient(strings.TrimPrefix(srv.URL, "http://"))
	var lines []CopyProgress
	img, err := c.CopyImage(context.Background(), CreateImageRequest{Name: "vm2", Source: "vm1", Size: 1 << 20}, func(p CopyProgress) { lines = append(lines, p) })
	if err != nil || img.Name != "vm2" || len(lines) != 2 || lines[1].Done != 1 {
		t.Fatalf("copy: %+v %v, progress %+v", img, err, lines)
	}
	// An error after the stream started reaches the caller with its status.
	_, err = c.CopyImage(context.Background(), CreateImageRequest{Name: "vm2", Source: "vm1", Size: 1 << 20}, nil)
	var se *StatusError
	if !errors.As(err, &se) || se.Status != http.StatusConflict {
		t.Fatalf("copy onto an existing name: %v", err)
	}
}

func TestCookieExpires(t *testing.T) {
	tok := []byte(testToken)
	now := time.Now()
	v := CookieValue(tok, now.Add(time.Hour))
	if !cookieValid(tok, v, now) {
		t.Fatal("a fresh cookie is refused")
	}
	if cookieValid(tok, v, now.Add(2*time.Hour)) {
		t.Fatal("an expired cookie is accepted")
	}
	if cookieValid([]byte("another token"), v, now) {
		t.Fatal("a cookie of another token is accepted")
	}
	_, mac, _ := strings.Cut(v, ".")
	if cookieValid(tok, strconv.FormatInt(now.Add(365*24*time.Hour).Unix(), 10)+"."+mac, now) {
		t.Fatal("a cookie whose expiry was moved is accepted")
	}
	if cookieValid(tok, CookieValue(tok, now.Add(30*24*time.Hour)), now) {
		t.Fatal("a cookie valid for longer than a login lasts is accepted")
	}
}

// slowCopy sends one progress line, then waits for release.
type slowCopy struct {
	*memService
	release chan struct{}
}

func (s slowCopy) CopyImage(ctx context.Context, r CreateImageRequest, progress func(CopyProgress)) (Image, error) {
	progress(CopyProgress{Done: 0, Total: 8})
	<-s.release
	return s.CreateImage(ctx, r)
}

// TestProgressIsStreamed: a progress line reaches the client while the
// copy still runs (the request log's writer passes flushes through).
func TestProgressIsStreamed(t *testing.T) {
	svc := slowCopy{&memService{images: map[string]Image{}}, make(chan struct{})}
	srv := httptest.NewServer(NewHandler(svc, "test", slog.New(slog.DiscardHandler)))
	defer srv.Close()
	var release sync.Once
	defer release.Do(func() { close(svc.release) }) // before srv.Close, which waits for the handler
	first := make(chan CopyProgress, 1)
	done := make(chan error, 1)
	go func() {
		_, err := NewClient(strings.TrimPrefix(srv.URL, "http://")).CopyImage(context.Background(), CreateImageRequest{Name: "b", Source: "a"},
			func(p CopyProgress) { first <- p })
		done <- err
	}()
	select {
	case p := <-first:
		if p.Total != 8 {
			t.Fatalf("first line %+v", p)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no progress line while the copy runs")
	}
	release.Do(func() { close(svc.release) })
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
