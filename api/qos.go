package api

import (
	"context"
	"net/http"
	"net/url"
)

// QoS is an image's I/O limits, enforced by its owner: operations and
// bytes per second, in total and per direction, each with a burst. 0 is
// no limit; a burst of 0 is one second's worth of its limit.
type QoS struct {
	IOPSLimit      int64 `json:"iops_limit,omitempty"`
	ReadIOPSLimit  int64 `json:"read_iops_limit,omitempty"`
	WriteIOPSLimit int64 `json:"write_iops_limit,omitempty"`
	BWLimit        int64 `json:"bw_limit,omitempty"` // bytes per second
	ReadBWLimit    int64 `json:"read_bw_limit,omitempty"`
	WriteBWLimit   int64 `json:"write_bw_limit,omitempty"`
	IOPSBurst      int64 `json:"iops_burst,omitempty"`
	ReadIOPSBurst  int64 `json:"read_iops_burst,omitempty"`
	WriteIOPSBurst int64 `json:"write_iops_burst,omitempty"`
	BWBurst        int64 `json:"bw_burst,omitempty"`
	ReadBWBurst    int64 `json:"read_bw_burst,omitempty"`
	WriteBWBurst   int64 `json:"write_bw_burst,omitempty"`
}

// QoSRequest is PUT /v1/images/{name}/qos: only the fields given change.
// A limit of 0 removes it (and its burst); a burst of 0 is one second's
// worth of its limit again; Clear removes every limit first.
type QoSRequest struct {
	IOPSLimit      *int64 `json:"iops_limit,omitempty"`
	ReadIOPSLimit  *int64 `json:"read_iops_limit,omitempty"`
	WriteIOPSLimit *int64 `json:"write_iops_limit,omitempty"`
	BWLimit        *int64 `json:"bw_limit,omitempty"`
	ReadBWLimit    *int64 `json:"read_bw_limit,omitempty"`
	WriteBWLimit   *int64 `json:"write_bw_limit,omitempty"`
	IOPSBurst      *int64 `json:"iops_burst,omitempty"`
	ReadIOPSBurst  *int64 `json:"read_iops_burst,omitempty"`
	WriteIOPSBurst *int64 `json:"write_iops_burst,omitempty"`
	BWBurst        *int64 `json:"bw_burst,omitempty"`
	ReadBWBurst    *int64 `json:"read_bw_burst,omitempty"`
	WriteBWBurst   *int64 `json:"write_bw_burst,omitempty"`
	Clear          bool   `json:"clear,omitempty"`
}

// SetImageQoS changes an image's QoS limits and returns them as stored.
func (c *Client) SetImageQoS(ctx context.Context, image string, req QoSRequest) (QoS, error) {
	var q QoS
	return q, c.do(ctx, http.MethodPut, "/v1/images/"+url.PathEscape(image)+"/qos", req, &q)
}

func (h *handler) setImageQoS(w http.ResponseWriter, r *http.Request) {
	var req QoSRequest
	if !decodeBody(w, r, &req) {
		return
	}
	q, err := h.svc.SetImageQoS(r.Context(), r.PathValue("name"), req)
	h.answer(w, r, q, err)
}
