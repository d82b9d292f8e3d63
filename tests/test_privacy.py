"""The privacy rule: personal data is found (and the pair dropped or scrubbed); what the web writes around
it (venue and brand domains, credits, years, sizes, scores, model numbers, famous addresses) is not."""

from __future__ import annotations

import pytest

from components.filter.config import PRIVACY_KINDS
from components.filter.rules import find_private, scrub

PRIVATE = [  # (caption, the kind find_private must report)
    ("Selling my bike, email jane.doe84@gmail.com for details", "email"),
    ("Contact: m.rossi@libero.it", "email"),
    ("Call me on +1 415-555-0132 if you want a print", "phone"),
    ("Puppies for sale, call (415) 555-0178 after 6pm", "phone"),
    ("Room to rent in Camden, ring 020 7946 0958", "phone"),
    ("Vends canapé, appeler le 06 12 34 56 78", "phone"),
    ("Verkaufe Sofa, Tel. 030 1234567", "phone"),
    ("WhatsApp 5550132 for the price", "phone"),
    ("Our new place: 221 Elm Street, apt 4B", "address"),
    ("Yard sale this Saturday at 1842 Maple Ave", "address"),
    ("Birthday party at 17 Kingsley Road, everyone welcome", "address"),
    ("Wir sind umgezogen: Lindenstraße 12, Köln", "address"),
    ("Open house at Kalverstraat 92a", "address"),
    ("Notre nouvel appartement au 12 rue de la Paix", "address"),
    ("Casa in vendita, Via Roma 10, Bologna", "address"),
    ("My SSN is 123-45-6789, please keep it safe", "id"),
    ("Lost passport no. X1234567 at the airport", "id"),
    ("Found an ID card, ID no: 4471 2290 88", "id"),
    ("Pay the deposit to IBAN DE89 3704 0044 0532 0130 00", "id"),
    ("Paid with card 4111 1111 1111 1111 by jane", "card"),
    ("More pictures at https://shapes.example.org/gallery/2291", "url"),
    ("My shop: etsy.com/shop/janesknits", "url"),
]

NOT_PRIVATE = [  # captions the web writes every day that hold no personal data
    "LeBron James dunks against the Boston Celtics during the second half at Crypto.com Arena.",
    "Booking.com office in Amsterdam",
    "Amazon.com boxes stacked in a warehouse",
    "Hotels.com ad on a billboard in Times Square",
    "Sunset over the bay. Photo: flickr.com/photos/jdoe/5521",
    "Misty forest (photo via https://unsplash.com/photos/abc123)",
    "Source: https://www.reuters.com/world/europe/",
    "© 2019 Jane Smith / janesmithphoto.com",
    "Prime Minister Keir Starmer outside 10 Downing Street",
    "Sherlock Holmes museum at 221B Baker Street",
    "Walking down Fifth Avenue at Christmas",
    "Shops along Oxford Street on Boxing Day",
    "Route 66 sign in Arizona",
    "Opening ceremony of the 2024 Olympics",
    "Roman ruins from 1998-2004 excavations",
    "Lakers beat the Celtics 102-98 at home",
    "Samsung 65 inch 4K TV, model QE65Q80C",
    "iPhone 15 Pro Max 256GB Natural Titanium",
    "Volkswagen ID.4 2023 in white",
    "Lego Star Wars Millennium Falcon 75192",
    "Ikea Billy bookcase in white, 80x28x202 cm",
    "Screen resolution 1920 x 1080 pixels",
    "Wedding on 05.12.2023 in Vienna",
    "The 5th Avenue Apple Store cube at night",
    "Dr. Martens 1460 boots, size 9",
    "Apollo 11 launch on 16 July 1969",
    "Flight LH 400 from Frankfurt to New York",
    "Tour de France stage 20 results",
    "ISO 9001 certificate on the wall",
    "Stanley Quencher H2.0 40oz tumbler",
    "Score: 3-2 after extra time",
    "Two cats on a sofa at 3 pm",
]


@pytest.mark.parametrize("caption,kind", PRIVATE)
def test_personal_data_is_found(caption, kind):
    assert [s[0] for s in find_private(caption)] == [kind], caption


@pytest.mark.parametrize("caption", NOT_PRIVATE)
def test_what_the_web_writes_is_not_personal_data(caption):
    assert find_private(caption) == [], caption


def test_kinds_can_be_switched_off_and_scrub_replaces_each_span():
    text = "Email jo@example.com or call +44 20 7946 0958, we live at 12 Elm Street"
    assert [s[0] for s in find_private(text)] == ["email", "phone", "address"]
    assert [s[0] for s in find_private(text, ("email",))] == ["email"]
    assert scrub(text, find_private(text)) == "Email <email> or call <phone>, we live at <address>"
    assert set(PRIVACY_KINDS) == {"email", "phone", "card", "id", "address", "url"}
