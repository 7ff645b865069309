package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client talks to one node's control API.
type Client struct {
	base string
	http *http.Client
}

// NewClient returns a client for addr ("127.0.0.1:7700" or a URL).
func NewClient(addr string) *Client {
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &Client{base: strings.TrimRight(base, "/"), http: &http.Client{Timeout: 60 * time.Second}}
}

// StatusError is a non-2xx answer.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
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
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the ukai API at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read answer of %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(data))
		}
		return &StatusError{Status: resp.StatusCode, Message: e.Error}
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

// DeleteImage deletes an image and its data.
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(name), nil, nil)
}
